"""The shared core of the benchmarks: timing (CUDA events, host time, warm-up, medians), the environment record
(device, driver, versions, git commit), model builders from ttt_e2e/model/sizes.py, the table printer and the one
writer of result JSON."""
