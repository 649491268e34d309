"""dolly-train: fine-tune Mistral-7B-Instruct on Dolly-15k with Ray Train + DeepSpeed ZeRO.

Stages, in the order they run: data (`trainer.data`) -> train (`trainer.recipe`, launched by
`trainer.launch`) -> export (`trainer.export`) -> eval (the `evaluator` package) -> deploy (`charts/`, and
`trainer.deploy` for RayJobs from the command line). The README's layout table names every module's job.
"""

__version__ = "0.1.0"
