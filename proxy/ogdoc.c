/* ogdoc: see ogdoc.h. */
#include "ogdoc.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "config.h"

int fs_og_template_add(char *buf, size_t cap, size_t *len, const char *key, const char *value) {
  size_t n = *len, i;
  const char *p;
  if (!*key || strspn(key, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != strlen(key)) return -1;
  if (strpbrk(value, "\r\n")) return -1;
#define PUT(c)                                                                                                         \
  do {                                                                                                                 \
    if (n + 1 >= cap) return buf[*len] = '\0', -1;                                                                     \
    buf[n++] = (c);                                                                                                    \
  } while (0)
  for (i = 0; key[i]; i++) PUT(key[i]);
  for (p = " = \""; *p; p++) PUT(*p);
  for (p = value; *p; p++) {
    if (*p == '"' || *p == '\\') PUT('\\');
    PUT(*p);
  }
  PUT('"');
  PUT('\n');
#undef PUT
  buf[n] = '\0';
  *len = n;
  return 0;
}

static const char *str_of(json_t *obj, const char *key) {
  json_t *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;
  return json_is_string(v) ? json_string_value(v) : NULL;
}

static int valid_b64(const char *s) {
  return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=") == strlen(s);
}

int fs_og_find_superlink(const char *json, size_t len, const char *role, fs_og_superlink *out, char *err,
                         size_t errlen) {
  json_error_t jerr;
  json_t *doc = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr), *roles, *r = NULL, *nodes;
  size_t i, n_nodes = 0;
  int rc = -1;
  memset(out, 0, sizeof(*out));
  if (!doc) {
    snprintf(err, errlen, "GET /service: not JSON (%s at %d:%d)", jerr.text, jerr.line, jerr.column);
    return -1;
  }
  roles = json_object_get(json_object_get(doc, "SERVICE"), "roles");
  if (!json_is_array(roles)) {
    snprintf(err, errlen, "GET /service: no SERVICE.roles list");
    goto out;
  }
  for (i = 0; i < json_array_size(roles); i++) {
    const char *name = str_of(json_array_get(roles, i), "name");
    if (name && !strcmp(name, role)) {
      r = json_array_get(roles, i);
      break;
    }
  }
  rc = 1;
  if (!r) {
    snprintf(err, errlen, "the service has no role named '%s' (--onegate-role)", role);
    goto out;
  }
  nodes = json_object_get(r, "nodes");
  if (nodes && !json_is_array(nodes)) {
    rc = -1;
    snprintf(err, errlen, "GET /service: role '%s' has a 'nodes' that is not a list", role);
    goto out;
  }
  for (i = 0; i < json_array_size(nodes); i++) {
    json_t *vmo = json_object_get(json_object_get(json_array_get(nodes, i), "vm_info"), "VM");
    json_t *ut = json_object_get(vmo, "USER_TEMPLATE");
    const char *ready = str_of(ut, "FL_READY"), *ep = str_of(ut, "FL_ENDPOINT"), *ca = str_of(ut, "FL_CA_CERT");
    const char *id = str_of(vmo, "ID");
    char host[256];
    int port;
    n_nodes++;
    if (!ready || strcasecmp(ready, "YES") || !ep || strlen(ep) >= sizeof(out->endpoint) ||
        fs_hostport_split(ep, host, sizeof(host), &port) < 0 || !host[0]) {
      continue;
    }
    if (ca && (strlen(ca) >= sizeof(out->ca_b64) || !valid_b64(ca))) {
      continue;
    }
    snprintf(out->endpoint, sizeof(out->endpoint), "%s", ep);
    snprintf(out->ca_b64, sizeof(out->ca_b64), "%s", ca ? ca : "");
    snprintf(out->vm_id, sizeof(out->vm_id), "%s", id ? id : "?");
    rc = 0;
    goto out;
  }
  if (!n_nodes) snprintf(err, errlen, "role '%s' has no VM yet", role);
  else
    snprintf(err, errlen, "none of the %zu VMs of role '%s' has published FL_READY = YES and an FL_ENDPOINT", n_nodes,
             role);
out:
  json_decref(doc);
  return rc;
}

int fs_og_link_ready(int serving, int draining, int ever_serving, uint64_t now_ms, uint64_t since_ms, uint64_t grace_ms,
                     uint64_t *recheck_ms) {
  uint64_t elapsed;
  *recheck_ms = 0;
  if (draining) return 0;
  if (serving) return 1;
  if (!ever_serving) return 0;
  elapsed = now_ms > since_ms ? now_ms - since_ms : 0;
  if (elapsed >= grace_ms) return 0;
  *recheck_ms = grace_ms - elapsed;
  return 1;
}
