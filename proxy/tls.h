/*
 * tls: OpenSSL contexts for the listener (link role) and the upstream
 * (node role), certificate loading from a path or base64 PEM, and the
 * auto-generated ECDSA P-256 CA + server certificate of the link role.
 *
 * Every context requires ALPN "h2": Flower's gRPC clients refuse a TLS
 * peer that does not select it.
 */
#ifndef FS_TLS_H
#define FS_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

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

/* Nonzero when the client of |ssl| offered ALPN but not "h2", or offered
 * none: set by the ALPN callback so the failure can be logged clearly. */
int fs_tls_alpn_refused(const SSL *ssl);

/* The notAfter (Unix time) of the certificate the last context built
 * with fs_tls_server_ctx() (|client| 0) or fs_tls_client_ctx() (|client|
 * 1) presents; 0 when it has none. */
int64_t fs_tls_cert_not_after(int client);

/* The most recent OpenSSL error as text (a static buffer), or |fallback|. */
const char *fs_tls_error_string(const char *fallback);

#endif
