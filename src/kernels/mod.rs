//! Quantized matmul kernels. OWNED BY THE KERNEL WORK: this stub only marks the place.
