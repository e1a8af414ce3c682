"""The row schema: the name of every column of a result row, in one place.

The sweep writes rows with these names (:mod:`kdbench.sweep.rows`), the store keeps them, and the
report reads them back by the same names (:mod:`kdbench.report.rows`).
"""

from __future__ import annotations


class Col:
    """Every column a row has: the sweep writes them here, the report reads them by these names."""

    RUN_ID = "run_id"
    KIND = "kind"  # "teacher" or "student"
    METHOD = "method"
    METHOD_PAPER = "method_paper"
    PAIR = "pair"  # kdbench.suites.pair_label(teachers, student); teachers may carry '@seed'
    TEACHERS = "teachers"  # 'a+b', without seeds; '' for a teacher or ce run
    STUDENT = "student"  # the trained model (for a teacher row: the teacher itself)
    DATASET = "dataset"
    SCHEDULE = "schedule"
    SHORTENED = "shortened"
    EPOCHS = "epochs"
    RECIPE_EPOCHS = "recipe_epochs"
    PRECISION = "precision"
    SEED = "seed"
    HPARAMS = "hparams"  # JSON of the method's hyperparameters
    STATUS = "status"  # OK, or why the run has no result ("diverged")
    ERROR = "error"
    REAL_DATA = "real_data"
    TEST_SIZE = "test_size"
    PARAMS = "params"
    EXTRA_PARAMS = "extra_params"
    METHOD_VARIANT = "method_variant"        # Method.variant(): 'ls' makes kd's table label kd+ls
    INIT_EPOCHS = "init_epochs"              # a method's init stage, trained before the schedule (AB, FT, FSP)
    HISTORY_INIT_LOSS = "history_init_loss"  # its epochs' mean loss terms (the init stage is not evaluated)
    METHOD_STATE_MB = "method_state_mb"      # the method's untrained state, e.g. CRD's memory bank
    FLOPS = "flops_per_image"
    THROUGHPUT = "throughput_img_s"
    THROUGHPUT_DEVICE = "throughput_device"
    THROUGHPUT_BATCH = "throughput_batch"
    THROUGHPUT_DTYPE = "throughput_dtype"
    THROUGHPUT_REPEATS = "throughput_repeats"
    THROUGHPUT_ITERS = "throughput_iters"
    THROUGHPUT_NOTE = "throughput_note"  # why throughput_img_s is NaN (not measured), '' when measured
    DEVICE = "device"
    GIT_COMMIT = "git_commit"
    COMMAND = "command"
    KDBENCH_VERSION = "kdbench_version"
    TORCH_VERSION = "torch_version"
    TIMM_VERSION = "timm_version"
    FINISHED_AT = "finished_at"
    TEACHER_IDS = "teacher_ids"  # 'id+id', the run ids of a student's teachers
    TEACHER_SEEDS = "teacher_seeds"  # 'seed+seed'
    TEACHER_ENSEMBLE_TOP1 = "teacher_ensemble_top1"  # the teachers' ensemble, last epoch
    METHOD_SOURCE = "method_source"  # a fingerprint of the method's code (kdbench.registry.method_source)
    DATASET_SOURCE = "dataset_source"
    TRAIN_SIZE = "train_size"
    # The resolution (kdbench.data.resolution): the images' side in px as trained and evaluated (FLOPs and
    # throughput are measured at it), the centre crop's fraction and the interpolation ('' when as stored).
    IMAGE_SIZE = "image_size"
    DATA_BACKEND = "data_backend"  # memory or stream (kdbench.data.stream); rows before it: memory
    CROP_PCT = "crop_pct"
    INTERPOLATION = "interpolation"
    RECIPE = "recipe"
    RECIPE_CONFIG = "recipe_config"
    TOP1_LAST, TOP5_LAST, TOP1_BEST, TOP5_BEST = "top1_last", "top5_last", "top1_best", "top5_best"
    BEST_EPOCH = "best_epoch"
    AGREEMENT = "agreement"
    TRAIN_TIME = "train_time_s"
    # Per-epoch training time (steps only): the run's first epoch, which includes torch.compile and CUDA-graph
    # recording, and the median of the steady-state epochs (those after the first this process trained; NaN
    # when there is none). first_epoch_s - epoch_time_s is about what compiling and warming up cost.
    FIRST_EPOCH_TIME = "first_epoch_s"
    EPOCH_TIME = "epoch_time_s"
    # The wall time of the training steps that compiled a graph (torch.compile's tracing and code generation,
    # the lazily compiled backward, and the step itself), summed over the run; part of train_time_s. 0 for an
    # eager run.
    COMPILE_TIME = "compile_time_s"
    EVAL_TIME = "eval_time_s"
    CHECKPOINT_TIME = "checkpoint_time_s"
    RESUMED_FROM = "resumed_from_epoch"
    WORLD_SIZE = "world_size"
    PEAK_MEM = "peak_mem_mb"
    PEAK_MEM_KIND = "peak_mem_kind"
    # On a GPU, the run's own peak: peak_mem_mb less what was allocated when it began (the dataset, teachers,
    # caches and the student's weights, shared with other runs); NaN on the CPU.
    PEAK_MEM_RUN = "peak_mem_run_mb"
    FLUSH_DENORMAL = "flush_denormal"
    CHANNELS_LAST = "channels_last"
    TF32_CONV = "tf32_conv"  # TF32 allowed in cuDNN convolutions (None off CUDA); off for fp32 runs
    TF32_MATMUL = "tf32_matmul"  # TF32 allowed in CUDA matmuls (None off CUDA); off for fp32 runs
    COMPILED = "compiled"  # whether the run trained compiled (false after a fallback to eager)
    COMPILE_ERROR = "compile_error"  # why torch.compile failed under --compile auto ('' when it did not)
    HISTORY_TOP1 = "history_top1"
    HISTORY_LOSS = "history_loss"
    MODEL_KWARGS = "model_kwargs"
    TEACHER_CACHE = "teacher_cache"
    TEACHER_CACHE_BUILD = "teacher_cache_build_s"
    TEACHER_CACHE_OFF = "teacher_cache_off"  # why the teachers ran online ('' when the cache served them)
    DIVERGED_AT = "diverged_at_epoch"
    TRAINED_BY_KDBENCH = "trained_by_kdbench"
    CHECKPOINT_SHA256 = "checkpoint_sha256"
    # The pretrained weights the row's model started from (a timm tag, hf-hub: name or --pretrained-file):
    # 'sha256:<hash of the loaded tensors>', '' for random initialisation. The tag is in the model's name.
    WEIGHTS = "weights"
    # How the row's model saw its input: 'dataset' (normalised with the dataset's mean and std), or a pretrained
    # model's own mean and std (kdbench.input_norm), e.g. 'model: mean (0.485, 0.456, 0.406), std (...)'.
    INPUT_NORM = "input_norm"
    # A validation split: the recipe's val_fraction and early_stop (always written, 0 = off), and the
    # split's results, empty (NaN, '') for runs without one.
    VAL_FRACTION = "val_fraction"
    EARLY_STOP = "early_stop"  # patience in epochs, 0 = off
    HISTORY_VAL_TOP1 = "history_val_top1"
    VAL_BEST_EPOCH = "val_best_epoch"  # the first epoch with the best validation top-1
    VAL_TOP1_BEST = "val_top1_best"  # that validation top-1
    TOP1_VAL_BEST, TOP5_VAL_BEST = "top1_val_best", "top5_val_best"  # test accuracy there: Col.top1("val_best")
    STOPPED_AT = "stopped_at_epoch"  # the epoch early stopping ended training after
    # Test errors at the last epoch: a count, and per class (class_errors.<i>: errors on the test images
    # of class i); every row has them.
    # The run's test-set predictions (kdbench.predictions): the file, relative to the results folder ('' for a run
    # without an evaluated epoch), and the test set's identity, which every row has.
    PREDICTIONS = "predictions"
    TEST_SET = "test_set_id"
    TEST_ERRORS = "test_errors"
    CLASS_ERRORS = "class_errors"
    # Transfer sets (kdbench.data.transfer) and bias adjustment (kdbench.bias), in student rows.
    TRANSFER = "transfer"  # its label ('without 3'); '' for the suite's own training set
    TRANSFER_ABSENT = "transfer_absent"  # JSON list of the classes it has no image of
    TRANSFER_TRAIN_SIZE = "transfer_train_size"  # the images the student was given to train on
    BIAS_GIVEN = "bias_given"  # JSON {class: offset} as given; '' for none
    BIAS_VAL = "bias_val"  # JSON {class: offset} searched on held-out training images; '' for none
    TEST_ERRORS_BIAS_GIVEN, TEST_ERRORS_BIAS_VAL = "test_errors_bias_given", "test_errors_bias_val"
    # class_errors_bias_given.<i>, class_errors_bias_val.<i>: per class with each adjustment
    BIAS_VAL_IMAGES = "bias_val_images"  # held-out images the offset was searched on
    BIAS_VAL_ERRORS_BEFORE = "bias_val_errors_before"  # errors on them without the offset
    BIAS_VAL_ERRORS_AFTER = "bias_val_errors_after"  # and with it
    # A member of a student ensemble (a pair written T:S*3 or T:A+B): the ensemble as tables name it ('s×3'), the
    # member's index (0-based) and the seed its student trained with. Member 0 also times the deployed ensemble.
    # '' / NaN for single students. The report judges the K members of one seed as one model (kdbench.report.members).
    ENSEMBLE = "ensemble"
    MEMBER = "member"
    MEMBER_SEED = "member_seed"
    ENSEMBLE_THROUGHPUT = "ensemble_throughput_img_s"  # the members as deployed, on member 0's row
    ENSEMBLE_THROUGHPUT_HOW = "ensemble_throughput_how"  # how they ran: one after another, batched (vmap) ...
    HP_PREFIX, LOSS_PREFIX, CLASS_PREFIX = "hp.", "loss.", "class_"  # hp.<name>, loss.<term>, class_f1.<i>

    @staticmethod
    def top1(selection: str) -> str:
        """The top-1 column at a selection rule: 'last' -> 'top1_last'."""
        return f"top1_{selection}"
