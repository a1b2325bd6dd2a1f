"""The stages of a round, one module each; every module exports its config section and one entry function, ``run``.

A stage reads artifact references and its typed config and returns the reference of the artifact it wrote (under
``<work_dir>/artifacts/<stage>/<key>``, the key hashing its inputs, its config and the code version, so a second
call with the same inputs returns the artifact at once). Stages never import Prefect: ``tasks/stages.py`` wraps each
in a task (``<stage>_task`` calls ``stages.<stage>.run``), and ``flows/round.py`` chains the tasks.

On-policy round (``data.mode: on_policy``)::

    prompts ──▶ collect ──▶ annotate ──▶ pair ──▶ train ──▶ evaluate (champion and candidate)

Off-policy round: ``dataset_pairs`` replaces prompts/collect/annotate/pair. Hybrid round (WPO's HB setting)::

    dataset_pairs ──▶ hybrid_prompts ──▶ collect ──▶ hybrid_candidates ──▶ annotate ──▶ hybrid_pair ──▶ train

| module              | ``run`` returns                                                  | config section            |
|---------------------|------------------------------------------------------------------|---------------------------|
| ``prompts``         | a prompt set (train or held-out split) as a table                | ``prompts``               |
| ``collect``         | K samples per prompt from the policy (vLLM), behavior log-probs  | ``collect``               |
| ``annotate``        | every sample scored by the judge (+ SPPO win-probabilities)      | ``judge``                 |
| ``pair``            | preference pairs from judged samples                             | ``pairs``                 |
| ``dataset_pairs``   | an off-policy preference dataset as a pairs table                | ``data.preference_data``  |
| ``hybrid_prompts``  | the dataset's prompts as a prompt table, for collect             | (none)                    |
| ``hybrid_candidates`` | dataset responses + samples, one table to judge                | (none)                    |
| ``hybrid_pair``     | pairs from judged candidates, each side's source kept            | ``data.hybrid``           |
| ``train``           | the checkpoint (one process, or torchrun: ``train/worker.py``)   | ``train``                 |
| ``evaluate``        | greedy held-out responses, judged; metrics in the manifest       | ``evaluate``              |

The services the stages use stay where they are: ``judges/`` (scoring), ``generation/`` (vLLM sampling),
``losses.py`` / ``logprobs.py`` / ``trainer.py`` (the training maths), ``evaluation/`` (benchmarks, paired
statistics), ``prompts/`` (prompt sources and the builtin generator).
"""
