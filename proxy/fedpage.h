/*
 * fedpage: the federation page served at GET / on the admin port: one
 * self-contained HTML document (proxy/fedpage.html, compiled in; no
 * external assets) whose script polls GET /v1/federation and draws the
 * topology, the round timeline, the training curves and the health.
 */
#ifndef FS_FEDPAGE_H
#define FS_FEDPAGE_H

#include <stddef.h>

extern const char fs_fedpage_html[];
extern const size_t fs_fedpage_len;

#endif
