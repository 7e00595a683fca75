# the mm kernel: a small Unix-like kernel with user programs embedded as one flat image
mm_SRCS := mm/main.c
