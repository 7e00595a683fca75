/* crt0.S - the user image's header and entry: exec starts every program at _start with the
   program id and its argument in the first two argument registers of the system-call ABI */
#include "../mm.h"
    .section .uhdr, "a"
    .long UHDR_MAGIC, _start, __text_end, __data_end, __bss_end

    .text
    .globl _start
_start:
#if defined(FMT_64)
    call umain                       /* umain(rdi = prog, rsi = arg): the SysV registers already */
#else
    pushl %ecx                       /* umain(prog = ebx, arg = ecx) */
    pushl %ebx
    call umain
#endif
    ud2                              /* umain calls exit; reaching here kills the process */

    .section .note.GNU-stack, "", @progbits
