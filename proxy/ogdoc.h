/*
 * ogdoc: OneGate's documents, without I/O (../shared/onegate.md).
 *
 *   - the body of PUT /vm: OpenNebula template text, one `KEY = "VALUE"`
 *     a line (never form encoding: the server would store `A=1&B=2` as one
 *     attribute A);
 *   - the answer of GET /service: which VM of the SuperLink's role is ready,
 *     its FL_ENDPOINT and FL_CA_CERT.
 *
 * Pure functions, unit-tested in tests/unit/test_ogdoc.c.
 */
#ifndef FS_OGDOC_H
#define FS_OGDOC_H

#include <stddef.h>
#include <stdint.h>

/* Largest FL_CA_CERT accepted (base64 of a PEM bundle). */
#define FS_OG_CA_MAX 16384

/* Appends `KEY = "VALUE"\n` to |buf| (capacity |cap|, |*len| bytes used,
 * kept NUL-terminated), escaping `"` and `\` in |value|.  |key| must be an
 * attribute name ([A-Z0-9_]+).  Returns 0, or -1 when |key| is not a name,
 * |value| holds a newline or it does not fit (|buf| unchanged then). */
int fs_og_template_add(char *buf, size_t cap, size_t *len, const char *key, const char *value);

typedef struct fs_og_superlink {
  char vm_id[24];
  char endpoint[256];        /* FL_ENDPOINT, HOST:PORT */
  char ca_b64[FS_OG_CA_MAX]; /* FL_CA_CERT, "" when the VM publishes none */
} fs_og_superlink;

/* Finds, in a GET /service answer (|json|, |len| bytes), the first VM of the
 * role named |role| whose USER_TEMPLATE has FL_READY = YES and a valid
 * FL_ENDPOINT.  Returns 0 and fills |out|; 1 when there is none yet (the
 * role has no VM, none is ready: a reason in |err|, ask again later); -1
 * when the document is not what OneGate sends (a reason in |err|). */
int fs_og_find_superlink(const char *json, size_t len, const char *role, fs_og_superlink *out, char *err,
                         size_t errlen);

/* The link's FL_READY: 0 while draining; 1 while SERVING; 0 before the
 * first SERVING (a value left by an earlier run must not attract nodes);
 * after SERVING was lost at |since_ms|, 1 until |grace_ms| have passed
 * (with the time left in |*recheck_ms|), then 0. */
int fs_og_link_ready(int serving, int draining, int ever_serving, uint64_t now_ms, uint64_t since_ms, uint64_t grace_ms,
                     uint64_t *recheck_ms);

#endif
