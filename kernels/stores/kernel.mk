# stores: every kind of store x86 can make, aimed at a shadowed guest page table
KERNELS += stores
stores_SRCS := stores/main.c
