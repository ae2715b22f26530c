/*
 * list: one intrusive doubly linked list for every list in the sidecar
 * (the Linux kernel's list_head, cut down).  An object that lives on a list
 * embeds an fs_list_node; the list itself is an fs_list_node used as the
 * head of a ring, so insert and remove never branch on the ends and an
 * object can leave a list without knowing which list it is on.
 *
 *   fs_list_init(&conn->calls);
 *   fs_list_push_front(&conn->calls, &call->down_node);
 *   fs_list_for_each_safe(n, next, &conn->calls) {
 *     call *c = fs_list_entry(n, call, down_node); ...
 *   }
 *
 * A node that is on no list is "unlinked" (fs_list_node_init, or after
 * fs_list_remove); fs_list_linked() tells.
 */
#ifndef FS_LIST_H
#define FS_LIST_H

#include <stddef.h>

typedef struct fs_list_node {
  struct fs_list_node *prev, *next;
} fs_list_node;

/* An empty list, or an unlinked node. */
static inline void fs_list_init(fs_list_node *n) { n->prev = n->next = n; }
#define fs_list_node_init fs_list_init

static inline int fs_list_empty(const fs_list_node *head) { return head->next == head; }
static inline int fs_list_linked(const fs_list_node *n) { return n->next != n && n->next != NULL; }

static inline void fs_list_insert_between(fs_list_node *n, fs_list_node *prev, fs_list_node *next) {
  n->prev = prev;
  n->next = next;
  prev->next = n;
  next->prev = n;
}

static inline void fs_list_push_front(fs_list_node *head, fs_list_node *n) {
  fs_list_insert_between(n, head, head->next);
}
static inline void fs_list_push_back(fs_list_node *head, fs_list_node *n) {
  fs_list_insert_between(n, head->prev, head);
}

/* Unlinks |n| from whatever list it is on; a no-op on an unlinked node. */
static inline void fs_list_remove(fs_list_node *n) {
  if (!fs_list_linked(n)) return;
  n->prev->next = n->next;
  n->next->prev = n->prev;
  fs_list_init(n);
}

/* The first node, or NULL when |head| is empty. */
static inline fs_list_node *fs_list_first(const fs_list_node *head) { return fs_list_empty(head) ? NULL : head->next; }

#define fs_list_entry(node, type, member) ((type *)(void *)((char *)(node)-offsetof(type, member)))

#define fs_list_for_each(n, head) for ((n) = (head)->next; (n) != (head); (n) = (n)->next)

/* Safe against removing |n| (only |n|) inside the loop body. */
#define fs_list_for_each_safe(n, tmp, head)                                                                            \
  for ((n) = (head)->next, (tmp) = (n)->next; (n) != (head); (n) = (tmp), (tmp) = (n)->next)

#endif
