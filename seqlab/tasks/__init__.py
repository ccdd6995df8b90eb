"""Tasks and mixtures (`registry`) and the built-in suite derived from a corpus (`builtin`)."""

from seqlab.tasks.registry import (KINDS, SPLITS, Mixture, Task, get, hf_task, jsonl_task,
                                   names, register, to_seq2seq)
from seqlab.tasks.builtin import register_suite
