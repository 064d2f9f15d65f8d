//! Nilpotent shift state: causal depthwise convolution and its ring-buffer update, SPEC §3.
