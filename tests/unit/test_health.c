/* Unit tests: the health verdict (README.md, "Health, the admin port and
 * `flower-probe`") and the service names the admin port answers for. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "health.h"
#include "health.pb-c.h"

/* The enum values are grpc.health.v1's wire values (admin.c sends them as
 * they are): checked by the compiler, against the generated protocol. */
_Static_assert((int)FS_HEALTH_UNKNOWN == (int)GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__UNKNOWN &&
                   FS_HEALTH_UNKNOWN == 0,
               "UNKNOWN is 0 on the wire");
_Static_assert((int)FS_HEALTH_SERVING == (int)GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING &&
                   FS_HEALTH_SERVING == 1,
               "SERVING is 1 on the wire");
_Static_assert((int)FS_HEALTH_NOT_SERVING ==
                       (int)GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING &&
                   FS_HEALTH_NOT_SERVING == 2,
               "NOT_SERVING is 2 on the wire");
_Static_assert((int)FS_HEALTH_SERVICE_UNKNOWN ==
                       (int)GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN &&
                   FS_HEALTH_SERVICE_UNKNOWN == 3,
               "SERVICE_UNKNOWN is 3 on the wire");

/* The condition a NOT_SERVING reason must name, by the first unmet input in
 * the order draining, listener, upstream. */
static const char *expected_keyword(int listening, int upstream_up, int draining) {
  if (draining) return "draining";
  if (!listening) return "listener";
  if (!upstream_up) return "upstream";
  return NULL;
}

/* All eight combinations: SERVING exactly for (listening, upstream up, not
 * draining); every other one NOT_SERVING with a reason naming the first
 * unmet condition. */
static void all_input_combinations(void **state) {
  int l, u, d;
  (void)state;
  for (l = 0; l <= 1; l++)
    for (u = 0; u <= 1; u++)
      for (d = 0; d <= 1; d++) {
        fs_health_inputs in = {l, u, d, 1};
        const char *reason = NULL;
        const char *kw = expected_keyword(l, u, d);
        fs_health_status st = fs_health_eval(&in, &reason);
        print_message("listening=%d upstream_up=%d draining=%d -> %s (%s)\n", l, u, d, fs_health_status_name(st),
                      reason ? reason : "(null)");
        assert_non_null(reason);
        assert_true(strlen(reason) > 0);
        if (l && u && !d) {
          assert_int_equal(st, FS_HEALTH_SERVING);
        } else {
          assert_int_equal(st, FS_HEALTH_NOT_SERVING);
          assert_non_null(strstr(reason, kw));
        }
      }
}

/* The reason depends only on the first unmet condition, not on the others:
 * /healthz bodies and health.change events stay the same while, say, a
 * draining sidecar also loses its upstream. */
static void reason_names_first_unmet_condition(void **state) {
  const char *r1, *r2, *r3, *r4;
  fs_health_inputs a = {1, 1, 1, 1}, b = {0, 0, 1, 1}, c = {0, 1, 0, 1}, e = {0, 0, 0, 1};
  (void)state;
  fs_health_eval(&a, &r1);
  fs_health_eval(&b, &r2);
  assert_string_equal(r1, r2);
  assert_non_null(strstr(r1, "draining"));
  fs_health_eval(&c, &r3);
  fs_health_eval(&e, &r4);
  assert_string_equal(r3, r4);
  assert_null(strstr(r3, "upstream"));
  /* the three NOT_SERVING reasons differ from each other and from SERVING's */
  {
    fs_health_inputs up = {1, 0, 0, 1}, ok = {1, 1, 0, 1};
    const char *r5, *r6;
    assert_int_equal(fs_health_eval(&up, &r5), FS_HEALTH_NOT_SERVING);
    assert_int_equal(fs_health_eval(&ok, &r6), FS_HEALTH_SERVING);
    assert_string_not_equal(r1, r3);
    assert_string_not_equal(r1, r5);
    assert_string_not_equal(r3, r5);
    assert_string_not_equal(r5, r6);
    assert_null(strstr(r6, "not"));
  }
}

/* Inputs are truth values: any nonzero counts as set. */
static void nonzero_inputs_are_true(void **state) {
  const char *reason;
  fs_health_inputs serving = {7, -1, 0, 3}, draining = {1, 1, 42, 1};
  (void)state;
  assert_int_equal(fs_health_eval(&serving, &reason), FS_HEALTH_SERVING);
  assert_int_equal(fs_health_eval(&draining, &reason), FS_HEALTH_NOT_SERVING);
  assert_non_null(strstr(reason, "draining"));
}

/* Pure: the same inputs always give the same verdict and reason, and the
 * reason is a static string (still valid after later calls). */
static void eval_is_pure(void **state) {
  const char *first[8];
  int i, round;
  (void)state;
  for (round = 0; round < 3; round++)
    for (i = 0; i < 8; i++) {
      fs_health_inputs in = {i & 1, (i >> 1) & 1, (i >> 2) & 1, 1};
      const char *reason;
      fs_health_status st = fs_health_eval(&in, &reason);
      assert_int_equal(st, (i & 3) == 3 && !(i & 4) ? FS_HEALTH_SERVING : FS_HEALTH_NOT_SERVING);
      if (round == 0) first[i] = reason;
      else assert_ptr_equal(first[i], reason);
    }
}

static void known_services(void **state) {
  static const char fleet[] = "flwr.proto.Fleet";
  (void)state;
  assert_true(fs_health_known_service("", 0));
  assert_true(fs_health_known_service(NULL, 0)); /* an absent field is "" */
  assert_true(fs_health_known_service(fleet, strlen(fleet)));
  /* length-delimited (protobuf strings): bytes after len are not looked at */
  assert_true(fs_health_known_service("flwr.proto.FleetXYZ", 16));
  assert_true(fs_health_known_service("garbage", 0));
}

static void unknown_services(void **state) {
  static const char *const names[] = {
      "flwr.proto.Fleet ",
      " flwr.proto.Fleet",
      "flwr.proto.fleet",
      "FLWR.PROTO.FLEET",
      "flwr.proto.Flee",
      "flwr.proto.Fleet.",
      "flwr.proto.Fleet/",
      "flwr.proto",
      "Fleet",
      "grpc.health.v1.Health",
      "flwr.proto.Control",
      "flwr.proto.ServerAppIo",
      "*",
      "/",
      " ",
      "x",
  };
  size_t i;
  (void)state;
  for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    assert_false(fs_health_known_service(names[i], strlen(names[i])));
  }
  /* a prefix of the name, a name with an embedded NUL, and one that only
   * matches as a C string */
  assert_false(fs_health_known_service("flwr.proto.Fleet", 15));
  assert_false(fs_health_known_service("flwr.proto.Fleet\0", 17));
  assert_false(fs_health_known_service("\0flwr.proto.Fleet", 17));
  assert_false(fs_health_known_service("flwr.proto.Fleet\0flwr.proto.Fleet", 33));
  {
    char big[4096];
    memset(big, 'a', sizeof(big));
    memcpy(big, "flwr.proto.Fleet", 16);
    assert_false(fs_health_known_service(big, sizeof(big)));
  }
}

static void status_names(void **state) {
  (void)state;
  assert_string_equal(fs_health_status_name(FS_HEALTH_UNKNOWN), "UNKNOWN");
  assert_string_equal(fs_health_status_name(FS_HEALTH_SERVING), "SERVING");
  assert_string_equal(fs_health_status_name(FS_HEALTH_NOT_SERVING), "NOT_SERVING");
  assert_string_equal(fs_health_status_name(FS_HEALTH_SERVICE_UNKNOWN), "SERVICE_UNKNOWN");
  assert_string_equal(fs_health_status_name((fs_health_status)99), "UNKNOWN");
  assert_string_equal(fs_health_status_name((fs_health_status)-1), "UNKNOWN");
}

/* --upstream-health: with the upstream connected, the SuperLink's own
 * health decides; its reason is its own. */
static void superlink_health_is_required(void **state) {
  fs_health_inputs sick = {1, 1, 0, 0}, down = {1, 0, 0, 0}, draining = {1, 1, 1, 0};
  const char *r1, *r2, *r3;
  (void)state;
  assert_int_equal(fs_health_eval(&sick, &r1), FS_HEALTH_NOT_SERVING);
  assert_non_null(strstr(r1, "SuperLink health"));
  assert_int_equal(fs_health_eval(&down, &r2), FS_HEALTH_NOT_SERVING);
  assert_non_null(strstr(r2, "upstream not connected")); /* the first unmet condition */
  assert_int_equal(fs_health_eval(&draining, &r3), FS_HEALTH_NOT_SERVING);
  assert_non_null(strstr(r3, "draining"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(all_input_combinations),
      cmocka_unit_test(reason_names_first_unmet_condition),
      cmocka_unit_test(nonzero_inputs_are_true),
      cmocka_unit_test(eval_is_pure),
      cmocka_unit_test(superlink_health_is_required),
      cmocka_unit_test(known_services),
      cmocka_unit_test(unknown_services),
      cmocka_unit_test(status_names),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
