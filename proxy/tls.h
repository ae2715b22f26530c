/*
 * tls: OpenSSL contexts for the listener (link role) and the upstream
 * (node role), certificate loading from a path or base64 PEM, and the
 * auto-generated ECDSA P-256 CA + server certificate of the link role.
 *
 * Every context requires ALPN "h2": Flower's gRPC clients refuse a TLS
 * peer that does not select it.
 *
 * The certificate lifecycle (README, "Certificates: reload and renewal"):
 * SIGHUP (fs_tls_reload) re-reads the operator's files or re-checks the
 * auto-generated ones; a renewal timer renews the auto-generated ones before
 * they expire (renew.h).  Every new context goes to the listener (link) or
 * the upstream pool (node) through the |install| function given to
 * fs_tls_lifecycle_start(): new handshakes use it, established connections
 * keep theirs (each SSL holds a reference to its SSL_CTX).  A file that
 * does not load keeps the context in use (event cert.reload, ok false).
 *
 * When the CA of the listener's certificate changes (a renewed or replaced
 * auto-generated CA, or a new --tls-ca on SIGHUP) it is announced first:
 * event cert.renew (cert "ca"), then the fs_tls_on_ca_change() callback with
 * the new CA; the listener switches to the certificate it signs only
 * --tls-ca-switch-delay seconds later, or as soon as fs_tls_ca_published()
 * is called, whichever comes first.  Until then new handshakes still get
 * the old certificate and fs_tls_current_ca_pem() still returns the old CA.
 */
#ifndef FS_TLS_H
#define FS_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"

/* Reads a PEM given as a file path or as base64 of the PEM text.  On
 * success returns 0, |*pem| (NUL-terminated, caller frees) and |*source|
 * ("file" or "base64").  On failure returns -1 and a reason in |err|. */
int fs_tls_read_pem(const char *value, char **pem, size_t *len, const char **source, char *err, size_t errlen);

/* Builds the listener context of the link role from |cfg|: the given
 * certificate and key, or the auto-generated ones in cfg->tls_dir (created
 * or renewed as needed).  Logs a "tls.ready" event saying what is used.
 * Returns NULL with a one-line reason in |err| on failure. */
SSL_CTX *fs_tls_server_ctx(const fs_config *cfg, char *err, size_t errlen);

/* Builds the upstream context of the node role (verify against cfg->tls_ca,
 * optional client certificate).  Returns NULL with a reason on failure. */
SSL_CTX *fs_tls_client_ctx(const fs_config *cfg, char *err, size_t errlen);

/* Starts the lifecycle once the proxy runs: the renewal timer (link with
 * auto-generated certificates).  |install| takes ownership of a new context
 * and hands it to the listener or pool (fs_proxy_set_tls); |draining|
 * returns nonzero once nothing may be installed any more.  Does nothing
 * without TLS.  Returns 0, or a libuv error when a timer cannot be made. */
int fs_tls_lifecycle_start(uv_loop_t *loop, void (*install)(SSL_CTX *ctx), int (*draining)(void));

/* Closes the timers and frees a context still waiting for its switch and
 * the current CA copy.  Call once, at shutdown. */
void fs_tls_lifecycle_stop(void);

/* SIGHUP: re-reads the operator's certificate, key and CA (link server, or
 * node client certificate and CA), or re-checks the auto-generated ones
 * (renewing what is due or misses a name of the host).  Logs cert.reload
 * (ok true with files and not_after, or ok false with the reason; never key
 * material).  Ignored while draining; refused (ok false) while a CA switch
 * is pending. */
void fs_tls_reload(void);

/* |cb| is called, with the new CA's PEM (valid during the call only), each
 * time the CA of the listener's certificate changes while running, before
 * any handshake uses a certificate it signs (see above).  Not called for the
 * CA in use at start: read fs_tls_current_ca_pem() then.  One callback;
 * NULL removes it.  |cb| runs on the loop and must not block. */
void fs_tls_on_ca_change(void (*cb)(const char *ca_pem, void *arg), void *arg);

/* The new CA is published: a pending switch happens now instead of after
 * --tls-ca-switch-delay.  No effect when none is pending. */
void fs_tls_ca_published(void);

/* A copy (malloc'd, caller frees) of the PEM of the CA that signs the
 * listener's current server certificate: the auto-generated CA or the
 * operator's --tls-ca.  NULL on the node role, without TLS, with an
 * operator certificate and no --tls-ca, or out of memory. */
char *fs_tls_current_ca_pem(void);

/* notAfter (seconds since the epoch) of the listener's current server
 * certificate: 0, or -1 when there is none (node role, no TLS). */
int fs_tls_server_not_after(int64_t *not_after);

/* Nonzero when the client of |ssl| offered ALPN but not "h2", or offered
 * none: set by the ALPN callback so the failure can be logged clearly. */
int fs_tls_alpn_refused(const SSL *ssl);

/* The most recent OpenSSL error as text (a static buffer), or |fallback|. */
const char *fs_tls_error_string(const char *fallback);

#endif
