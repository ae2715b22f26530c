/* ogdoc: OneGate's documents (template text, GET /service) and FL_READY. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "ogdoc.h"

static void template_escapes_quotes_and_backslashes(void **state) {
  char buf[256];
  size_t len = 0;
  (void)state;
  buf[0] = '\0';
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "FL_READY", "YES"), 0);
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "FL_X", "a\"b\\c"), 0);
  assert_string_equal(buf, "FL_READY = \"YES\"\nFL_X = \"a\\\"b\\\\c\"\n");
  assert_int_equal(len, strlen(buf));
}

static void template_refuses_newlines_bad_names_and_overflow(void **state) {
  char buf[32];
  size_t len = 0;
  (void)state;
  buf[0] = '\0';
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "FL_A", "1\nFL_B = 2"), -1);
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "fl_a", "1"), -1);
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "A&B", "1"), -1);
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "FL_A", "1"), 0);
  assert_int_equal(fs_og_template_add(buf, sizeof(buf), &len, "FL_LONG", "0123456789012345678901234567890"), -1);
  assert_string_equal(buf, "FL_A = \"1\"\n"); /* unchanged by the failed add */
  assert_int_equal(len, 11);
}

#define VM(id, ut)     "{\"deploy_id\":" #id ",\"vm_info\":{\"VM\":{\"ID\":\"" #id "\",\"USER_TEMPLATE\":{" ut "}}}}"
#define SERVICE(roles) "{\"SERVICE\":{\"id\":\"12\",\"roles\":[" roles "]}}"

static int find(const char *json, fs_og_superlink *sl, char *err) {
  return fs_og_find_superlink(json, strlen(json), "superlink", sl, err, 200);
}

static void finds_the_first_ready_vm(void **state) {
  static fs_og_superlink sl;
  char err[200];
  const char *doc = SERVICE("{\"name\":\"supernode\",\"nodes\":[" VM(
      50,
      "\"FL_READY\":\"YES\",\"FL_ENDPOINT\":\"10.0.0.9:9092\"") "]},"
                                                                "{\"name\":\"superlink\",\"nodes\":[" VM(
                                                                    40,
                                                                    "\"FL_READY\":\"NO\",\"FL_ENDPOINT\":\"10.0.0.4:"
                                                                    "9092\"") "," VM(41,
                                                                                     "\"FL_READY\":\"yes\",\"FL_"
                                                                                     "ENDPOINT\":\"10.0.0.5:9092\","
                                                                                     "\"FL_CA_CERT\":\"QUJD\"") "]}");
  (void)state;
  assert_int_equal(find(doc, &sl, err), 0);
  assert_string_equal(sl.endpoint, "10.0.0.5:9092");
  assert_string_equal(sl.ca_b64, "QUJD");
  assert_string_equal(sl.vm_id, "41");
}

static void not_yet_while_booting_or_unpublished(void **state) {
  static fs_og_superlink sl;
  char err[200];
  (void)state;
  assert_int_equal(find(SERVICE("{\"name\":\"superlink\",\"nodes\":[]}"), &sl, err), 1);
  assert_non_null(strstr(err, "no VM yet"));
  assert_int_equal(find(SERVICE("{\"name\":\"superlink\",\"cardinality\":1}"), &sl, err), 1);
  assert_int_equal(find(SERVICE("{\"name\":\"superlink\",\"nodes\":[" VM(41, "") "]}"), &sl, err), 1);
  assert_non_null(strstr(err, "FL_READY"));
  assert_int_equal(find(SERVICE("{\"name\":\"other\",\"nodes\":[]}"), &sl, err), 1);
  assert_non_null(strstr(err, "no role named 'superlink'"));
  /* a ready VM with a malformed endpoint or CA is skipped, not trusted */
  assert_int_equal(find(SERVICE("{\"name\":\"superlink\",\"nodes\":[" VM(
                            41, "\"FL_READY\":\"YES\",\"FL_ENDPOINT\":\"10.0.0.5\"") "]}"),
                        &sl, err),
                   1);
  assert_int_equal(find(SERVICE("{\"name\":\"superlink\",\"nodes\":[" VM(
                            41, "\"FL_READY\":\"YES\",\"FL_ENDPOINT\":\"h:1\",\"FL_CA_CERT\":\"not base64!\"") "]}"),
                        &sl, err),
                   1);
}

static void malformed_documents(void **state) {
  static fs_og_superlink sl;
  char err[200];
  (void)state;
  assert_int_equal(find("<html>502</html>", &sl, err), -1);
  assert_non_null(strstr(err, "not JSON"));
  assert_int_equal(find("{\"SERVICE\":{}}", &sl, err), -1);
  assert_int_equal(find("{\"SERVICE\":{\"roles\":[{\"name\":\"superlink\",\"nodes\":{}}]}}", &sl, err), -1);
  assert_int_equal(find("{\"SERVICE\":{\"roles\":[{\"name\":\"superlink\",\"nodes\":[1,null,\"x\"]}]}}", &sl, err), 1);
  assert_int_equal(fs_og_find_superlink("{\"a\":1", 6, "superlink", &sl, err, sizeof(err)), -1);
}

static void oversized_ca_is_skipped(void **state) {
  static char doc[FS_OG_CA_MAX + 512];
  static char ca[FS_OG_CA_MAX + 10];
  static fs_og_superlink sl;
  char err[200];
  (void)state;
  memset(ca, 'A', sizeof(ca) - 1);
  ca[sizeof(ca) - 1] = '\0';
  snprintf(doc, sizeof(doc),
           SERVICE("{\"name\":\"superlink\",\"nodes\":[" VM(
               41, "\"FL_READY\":\"YES\",\"FL_ENDPOINT\":\"h:1\",\"FL_CA_CERT\":\"%s\"") "]}"),
           ca);
  assert_int_equal(find(doc, &sl, err), 1);
}

static void link_ready_follows_health_with_a_grace(void **state) {
  uint64_t recheck;
  (void)state;
  assert_int_equal(fs_og_link_ready(0, 0, 0, 1000, 0, 30000, &recheck), 0); /* before the first SERVING */
  assert_int_equal(fs_og_link_ready(1, 0, 1, 1000, 0, 30000, &recheck), 1);
  assert_int_equal(fs_og_link_ready(1, 1, 1, 1000, 0, 30000, &recheck), 0); /* draining */
  assert_int_equal(fs_og_link_ready(0, 0, 1, 11000, 1000, 30000, &recheck), 1);
  assert_int_equal(recheck, 20000);
  assert_int_equal(fs_og_link_ready(0, 0, 1, 31000, 1000, 30000, &recheck), 0);
  assert_int_equal(recheck, 0);
  assert_int_equal(fs_og_link_ready(0, 0, 1, 500, 1000, 0, &recheck), 0); /* no grace; clock before since */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(template_escapes_quotes_and_backslashes),
      cmocka_unit_test(template_refuses_newlines_bad_names_and_overflow),
      cmocka_unit_test(finds_the_first_ready_vm),
      cmocka_unit_test(not_yet_while_booting_or_unpublished),
      cmocka_unit_test(malformed_documents),
      cmocka_unit_test(oversized_ca_is_skipped),
      cmocka_unit_test(link_ready_follows_health_with_a_grace),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
