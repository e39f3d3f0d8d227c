"""The papers' claims as runnable experiments: `nanoseek experiment NAME`.

Each claim is one short module here that names its arms (configs sized to equal parameters
or compute), what to measure on each trained model and which comparisons the paper makes;
runner.py trains every arm for every seed through the project's trainer, and report.py
writes the table, the plot and the JSON under benchmarks/results/claims/<scale>/<name>/.

Nothing in the package imports this folder. The CLI imports only this registry (no torch)
to list the choices, and one experiment's module when it runs.
"""

# name: the claim it tests, in claim order (the module of the same name holds EXPERIMENT)
EXPERIMENTS = {
    "moe": "claim 1: DeepSeekMoE vs GShard (and dense) at equal parameters and activated compute",
    "balancing": "claim 2: auxiliary-loss-free balancing vs auxiliary losses vs none (loss, MaxVio)",
    "attention": "claim 3: MLA vs MHA vs GQA at equal parameters (loss, KV-cache bytes per token)",
    "mtp": "claim 4: multi-token prediction on/off (main-model loss, speculative acceptance, speedup)",
    "fp8": "claim 5: FP8 vs BF16 training loss curves (relative loss error)",
    "specialization": "claim 6: per-domain expert loads with and without the auxiliary loss",
}
