//! Quantized matmul kernels. OWNED BY THE KERNEL WORK: this stub only marks the place.

/// Name of the kernel path in use (stub).
pub fn isa() -> &'static str {
    "candle"
}
