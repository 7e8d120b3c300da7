//! flashattn-cuda backend (in progress).
