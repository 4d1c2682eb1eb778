// distattn._emulate: csrc/binding.cpp compiled with DISTATTN_EMULATE (set by the build), i.e.
// the torch binding of the kernels built for the host CTA emulator, on CPU tensors.
#include "../binding.cpp"
