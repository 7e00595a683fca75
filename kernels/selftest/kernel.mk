# the selftest kernel: x86 paging rules checked on the CPU it runs on (see selftest/selftest.c)
KERNELS += selftest
selftest_SRCS := selftest/selftest.c selftest/probe.S
