"""Peak GPU memory of a LoRA training step, estimated on the CPU without allocating (`krea2-train estimate CONFIG`,
scripts/estimate_memory.py; BENCHMARKS.md "Estimated peak memory" has the full-size figures).

The transformer is built on the `meta` device (no bytes, no model files read), the LoRA injected and the memory
settings applied as training does; then
    trace.py    dynamic bytes: one forward + backward of train/step.py's loss traced under `LiveBytes`, CUDA bf16
                autocast emulated, SDPA as a flash-attention cost model, NF4 layers as stand-ins
    static.py   resident weights as stored (quantised, offloaded), LoRA, optimiser states; FSDP shards and buffers;
                `totals`: allocated peak + allowance (CUDA context, workspaces, fragmentation) = "est. card"
    command.py  `estimate_config` for every stage of a run config, the verdict against a card, the CLI
Not modelled: torch.compile's own buffers (compile settings are estimated eager), kernel-internal scratch, one-off
set-up peaks, the optimiser step's own temporaries.
"""
