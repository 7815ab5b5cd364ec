# Recommended XLA and NCCL settings for training on H100 (SXM, NVLink/NVSwitch within a node,
# InfiniBand between nodes). Source it before starting Python, once per process environment:
#
#   source launch/h100_env.sh && python -m ultralong_jax.train ...
#
# launch/slurm_h100.sbatch sources it on every task. It appends to XLA_FLAGS (your own flags stay,
# and a second `source` adds nothing). Every XLA flag below is accepted by jaxlib 0.11.2 and
# 0.12.0.1 (tests/launch/test_launch.py imports jax with them): XLA aborts at start-up on an unknown
# flag, and flags come and go between jaxlib versions, so re-run that test after upgrading jaxlib.
#
# Provenance: the collective flags follow MaxText's GPU launch scripts and NVIDIA JAX-Toolbox's
# "Tips for High-Performance LLMs with JAX and XLA"; the thresholds are their values. We have not
# measured their effect on H100 ourselves (docs/launch.md): treat them as a starting point and
# compare step times with `python -m ultralong_jax.bench.train_step` with and without.

_ultralong_h100_xla_flags=(
  # Schedule collectives (FSDP all-gathers, gradient reduce-scatters, the ring's K/V
  # collective-permutes) asynchronously and move them to overlap with compute, instead of running
  # each one where it appears in the program. The single most important GPU flag for sharded
  # training.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Run those collectives on a high-priority CUDA stream, so a long compute kernel does not delay
  # the communication that the next layer waits on.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Combine many small collectives (one per parameter of a layer) into few large ones: NCCL
  # reaches its bandwidth only on messages of several MB. 128 MiB / 128 MiB / 64 MiB bounds keep
  # the combined buffers small next to the 80 GB of an H100.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  # Combine across tensors of different shapes too (the default combines only along one dim):
  # layer weights of different shapes then travel in one message.
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  # Pipelined collectives: in the scan over layers, issue layer i+1's parameter all-gather (and
  # layer i-1's gradient reduce-scatter / all-reduce) during layer i's compute, across loop
  # iterations, which the latency-hiding scheduler alone cannot do inside a while loop.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll the layer loop by two with double buffers, so the pipelined collectives of one
  # iteration have the other iteration's compute to hide behind.
  --xla_gpu_enable_while_loop_double_buffering=true
)
# Not set, on purpose: --xla_disable_hlo_passes=rematerialization (MaxText sets it for speed, but
# XLA's rematerialization is what keeps a 1M-token step inside memory when the estimate is tight);
# --xla_gpu_enable_triton_gemm=false and --xla_gpu_enable_command_buffer= (older JAX-Toolbox
# defaults; the current defaults are the ones XLA's GPU team tunes).

if [[ " ${XLA_FLAGS:-} " != *" ${_ultralong_h100_xla_flags[0]} "* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }${_ultralong_h100_xla_flags[*]}"
fi
unset _ultralong_h100_xla_flags

# JAX preallocates this fraction of each GPU's memory at start-up (default 0.75). The 8B 1M/2M/4M
# plans need ~59 GiB per device (docs/performance.md); 0.90 leaves ~8 GB to CUDA, cuDNN, NCCL
# buffers and the CUDA context. Lower it if NCCL or cuDNN fail to allocate at start-up.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

# One hardware work queue per device: kernels and collectives are issued in the order XLA's
# scheduler chose, so the overlap it planned happens (NVIDIA's Hopper advice; do NOT set it on
# Blackwell, where it serializes work).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# NCCL: report problems (set NCCL_DEBUG=INFO to see the topology and transports NCCL chose, the
# first thing to look at when a multi-node job is slow or hangs in its first collective).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Site-specific, left to you (your cluster's documentation has the values):
#   NCCL_SOCKET_IFNAME=<the interface of the hosts' management network, for NCCL's bootstrap>
#   NCCL_IB_HCA=<the InfiniBand/RoCE adapters to use>, NCCL_IB_SL / NCCL_IB_TC (service level)
#   NCCL_NET_GDR_LEVEL=PHB (GPUDirect RDMA), NCCL_CROSS_NIC=0 (rail-optimized fabrics)
# With AWS EFA or GCP A3 (TCPX/TCPXO), also follow the provider's NCCL plugin setup.
