# the mm kernel: a small Unix-like kernel; its user programs are one flat image embedded in it
mm_SRCS := mm/main.c mm/userimg.S
mm_DEPS = $(B)/obj-$(1)/mm/user.bin
MM_USER_SRCS := mm/user/crt0.S mm/user/ulib.c mm/user/progs.c lib/format.c lib/string.c

define MM_USER_rules
$(B)/obj-$(1)/mm/user.elf: $(patsubst %,$(B)/obj-$(1)/%.o,$(MM_USER_SRCS)) mm/user/user.ld
	$(LD) -m $(LDEMU_$(1)) $(LDFLAGS) -T mm/user/user.ld -o $$@ $$(filter %.o,$$^)
$(B)/obj-$(1)/mm/user.bin: $(B)/obj-$(1)/mm/user.elf
	$(OBJCOPY) -O binary $$< $$@
endef
$(foreach v,$(VARIANTS),$(eval $(call MM_USER_rules,$(v))))
