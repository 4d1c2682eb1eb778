// A minimal assertion harness for the host tests (no dependency beyond the standard library).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

namespace harness {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}
}  // namespace harness

// CHECK(cond) << "context";  prints the context on failure, stops after 20 failures.
struct CheckMessage {
  bool ok;
  const char* expr;
  const char* file;
  int line;
  std::ostringstream msg;
  CheckMessage(bool ok_, const char* e, const char* f, int l) : ok(ok_), expr(e), file(f), line(l) {}
  template <typename X>
  CheckMessage& operator<<(const X& x) {
    if (!ok) msg << x;
    return *this;
  }
  ~CheckMessage() {
    ++harness::checks();
    if (ok) return;
    std::fprintf(stderr, "%s:%d: CHECK(%s) failed: %s\n", file, line, expr, msg.str().c_str());
    if (++harness::failures() >= 20) {
      std::fprintf(stderr, "too many failures\n");
      std::exit(1);
    }
  }
};
#define CHECK(cond) CheckMessage(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
