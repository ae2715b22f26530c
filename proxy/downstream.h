/*
 * downstream: the client side (nghttpx's Http2Upstream): the Fleet
 * listener, client connections (TLS handshake timer, idle timer, drain),
 * and the client legs of calls: a request's HEADERS start a call, which
 * uppool.c routes once the request headers are complete; the response
 * goes back through call.c.
 *
 * One listener per process.
 */
#ifndef FS_DOWNSTREAM_H
#define FS_DOWNSTREAM_H

#include <openssl/ssl.h>
#include <stddef.h>

/* Listens on fs_env.cfg->listen with server TLS |tls| (NULL: h2c; the
 * listener frees it).  |on_maybe_idle| runs whenever the last client
 * connection may have gone (see fs_downstream_conns()).  Returns 0, or -1
 * with a one-line reason in |err|. */
int fs_downstream_start(SSL_CTX *tls, void (*on_maybe_idle)(void), char *err, size_t errlen);

/* Replaces the listener's TLS context (certificate reload or renewal):
 * connections accepted from now on use |tls|; those accepted before keep
 * the one their SSL holds a reference to.  Takes ownership of |tls| and
 * drops the listener's reference to the old one.  Only when the listener
 * was started with TLS and not stopped (else |tls| is freed). */
void fs_downstream_set_tls(SSL_CTX *tls);

/* Nonzero while the listener accepts. */
int fs_downstream_listening(void);

/* Draining: closes the listener, sends GOAWAY to every client (closes those
 * still in their TLS handshake), and closes what is left after
 * |timeout_ms|. */
void fs_downstream_drain(uint64_t timeout_ms);

/* Client connections still open (not yet freed). */
unsigned fs_downstream_conns(void);

/* Closes the drain timer and frees the callbacks and TLS context.  Call
 * once, when no client connection is left. */
void fs_downstream_stop(void);

#endif
