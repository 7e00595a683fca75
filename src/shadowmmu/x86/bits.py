"""Bit layouts of x86 paging: entry flags, #PF error code, control registers.

Plain ints, not enums: these are used on the hot path of every walk.  The
access kinds deliberately reuse the error-code bit positions (W=1, U=2, I/D=4)
so that an access can be OR-ed straight into an error code, the way KVM's
``PFERR_*`` masks double as access masks.
"""

# --- paging-structure entry bits (same low positions in 4- and 8-byte formats)
PTE_P = 1 << 0          # present
PTE_W = 1 << 1          # R/W: writes allowed
PTE_U = 1 << 2          # U/S: user accesses allowed
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5          # accessed
PTE_D = 1 << 6          # dirty (leaf only)
PTE_PS = 1 << 7         # page size (non-leaf levels); PAT on a 4 KB pte
PTE_G = 1 << 8          # global (leaf only, with CR4.PGE)
PTE_LARGE_PAT = 1 << 12  # PAT bit of a 2 MB / 4 MB / 1 GB leaf
PTE_PKEY_SHIFT = 59     # protection key, bits 62:59 of a 4/5-level leaf
PTE_PKEY_MASK = 0xF << PTE_PKEY_SHIFT
PTE_NX = 1 << 63        # execute disable (8-byte formats, EFER.NXE)

# --- #PF error code
PF_P = 1 << 0           # the fault was on a present entry (protection / reserved)
PF_W = 1 << 1
PF_U = 1 << 2
PF_RSVD = 1 << 3
PF_ID = 1 << 4          # instruction fetch (reported only with SMEP or PAE-format NX)
PF_PK = 1 << 5

# --- access kinds: same positions as the error code, plus IMPLICIT
ACC_WRITE = PF_W
ACC_USER = PF_U
ACC_FETCH = PF_ID
ACC_IMPLICIT = 1 << 8   # supervisor access made by the CPU itself: SMAP ignores RFLAGS.AC
# The rights a translation grants (what the page allows, as opposed to ACC_*:
# what the CPU is doing).  Bits 0-2 of the permission table's index.
R_W, R_U, R_X = 1, 2, 4
R_ALL = R_W | R_U | R_X

# --- control registers
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22

EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_AC = 1 << 18

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1


def mask(lo: int, hi: int) -> int:
    """Bits lo..hi inclusive."""
    return ((1 << (hi - lo + 1)) - 1) << lo


ENTRY_FLAG_NAMES = (
    (PTE_P, "P"), (PTE_W, "W"), (PTE_U, "U"), (PTE_PWT, "PWT"), (PTE_PCD, "PCD"),
    (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "PS"), (PTE_G, "G"), (PTE_NX, "NX"),
)

ERROR_CODE_NAMES = ((PF_P, "P"), (PF_W, "W"), (PF_U, "U"), (PF_RSVD, "RSVD"), (PF_ID, "I/D"), (PF_PK, "PK"))


def describe_error_code(code: int) -> str:
    """'0x7 (P|W|U): protection violation, write, user mode' — for people reading faults."""
    names = [n for bit, n in ERROR_CODE_NAMES if code & bit]
    cause = "reserved bit set" if code & PF_RSVD else (
        "protection-key violation" if code & PF_PK else (
            "protection violation" if code & PF_P else "not present"))
    kind = "fetch" if code & PF_ID else ("write" if code & PF_W else "read")
    mode = "user" if code & PF_U else "supervisor"
    return f"{code:#x} ({'|'.join(names) or '0'}): {cause}, {kind}, {mode} mode"
