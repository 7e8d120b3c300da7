//! flashattn-cpu backend (in progress).
