"""The names a run reports at each evaluation, apart from its loop: the sweep checks
`search.metric` against them before Ray starts, and `report` and `status` read them, without
importing the training stack."""

# Every name an evaluation report carries besides `eval_<task metric>` and `train_<term>` /
# `eval_<term>` of each objective: what training.py's `_train_stage`, `evaluate` and `_report` put in it.
LOOP_METRICS = frozenset({
    "train_loss", "train_ce", "examples_per_second", "learning_rate",  # _train_stage
    "score", "eval_loss", "eval_intermediate_loss",  # evaluate
    "step", "stage", "total_steps", "epoch", "peak_memory_mb", "student_parameters",  # _report
    "prediction_step", "best_score",  # _report, in the prediction stage
})
# Measurements of the machine at the moment, not results of the training: a step that a restored
# trial runs again reports the same results but measures these anew.
MEASURED_METRICS = frozenset({"examples_per_second", "peak_memory_mb"})
