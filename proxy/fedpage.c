/* fedpage: see fedpage.h.  build/gen/fedpage.inc is proxy/fedpage.html as
 * one C string literal (Makefile). */
#include "fedpage.h"

const char fs_fedpage_html[] =
#include "fedpage.inc"
    ;
const size_t fs_fedpage_len = sizeof(fs_fedpage_html) - 1;
