"""Evaluation of models and tokenizers: CORE (core.py, its task table core_tasks.py), the chat tasks
and ChatCORE (chat.py), HumanEval scoring that model code cannot forge (humaneval_check.py), the
shared harness of the evaluation stage (harness.py: loading, sharding, bpb, samples) and the
tokenizer's compression (compression.py)."""
