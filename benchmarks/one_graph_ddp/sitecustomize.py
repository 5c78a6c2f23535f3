"""Put this folder on PYTHONPATH to train compiled DDP runs as one graph, for comparing against pope-lm's default.

Under torch.compile, dynamo's DDPOptimizer splits the model's graph at DDP's gradient buckets (25 MB: about 20
pieces at 124M) so that each bucket's all-reduce starts while the backward still runs. With optimize_ddp off the
model compiles as one graph and DDP all-reduces once the backward has produced every gradient. Python imports
sitecustomize at startup in every process, so torchrun's ranks get it too:

    NPROC=2 PYTHONPATH=benchmarks/one_graph_ddp bash benchmarks/recipe_run.sh one-graph recipes/124m.yaml

Session 26 measured the 124m recipe on two H200s: +10.5% tokens/s (benchmarks/train_throughput_results.md).
"""

import torch._dynamo

torch._dynamo.config.optimize_ddp = False
print("benchmarks/one_graph_ddp: torch._dynamo.config.optimize_ddp = False", flush=True)
