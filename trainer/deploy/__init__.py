"""Deployment on Kubernetes: the RayJob side of `dolly-train` (submit, status, wait, logs, suspend, resume, delete).

    state.py   what KubeRay reports about a RayJob and what it means (no Kubernetes client needed)
    client.py  the API client: credentials, RayJob/ConfigMap/pod calls, errors, watches
    rayjob.py  building a RayJob: from a YAML file, or `helm template` of charts/dolly-train for a train config
    cli.py     the subcommands and their argparse parsers (registered by trainer/cli.py)

It lives in the trainer package (not beside it) because the `dolly-train` CLI and the images ship it with the
trainer; nothing in the training path (trainer.recipe, trainer.launch) imports it.
"""
