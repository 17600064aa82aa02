"""Evaluations of a model: passkey retrieval (`passkey`), perplexity against context length (`perplexity`), and
lm-evaluation-harness (`lm_eval_model`), with their pictures (`plots`) and resumable results files (`store`)."""
