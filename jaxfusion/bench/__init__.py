"""The measurements, as a library the command line (and a notebook) calls: `analyze`
(per-device cost of a configuration from compiled shapes), `timing` (wall time per image
and per step), `profile` (a trace, the optimized HLO and its collectives) and `evaluate`
(PSNR/SSIM of each mode against one device). Each `run` takes its options from `options`
(plain values, checked when made) and, but for `analyze`, the pipeline it measures."""
