"""dmirror, the reference device (a port of the kernel's lib/test_hmm.c)."""
