"""Native kernels that XLA lacks, each with an XLA fallback of the same semantics."""
