"""Host-side helpers shared by the launch code of the kernel files."""
import os


def interpreting():
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a, b):
    """Integer ceil-division. triton.cdiv is a constexpr function and costs ~6 us per host
    call, which adds up over the launches of a step."""
    return -(-a // b)
