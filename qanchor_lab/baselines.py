"""Downstream scorers that are not Q-Anchor itself: the oracle, hand-crafted features with GBDT or
logistic regression, the features plus a TF-IDF bag of the users' event texts, a general-purpose text
embedding of the serialised behaviour, the linear probe that turns any user embedding (static,
untrained or Q-Anchor) into task scores, and that probe on the features and an embedding together.

Every scorer fits on the TUNE users' labels only and scores the TEST users; nothing here reads a
test user's label. Output is always the long table `user_id, task_id, score` (higher = more likely
positive), one row per (test user, task), in tasks-table order then test-user order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from qanchor_lab.data import DataValidationError, validate_labels, validate_tasks
from qanchor_lab.parallel import fit_map
from qanchor_lab.schema import string_list

FeatureModel = Literal["gbdt", "logreg"]
FEATURE_MODELS: tuple[str, ...] = get_args(FeatureModel)
# classifiers of a QA claim (the diagnostics' yardstick from the tabular input, and their probe of an embedding)
ClaimModel = Literal["logreg", "gbdt", "probe"]
CLAIM_MODELS: tuple[str, ...] = get_args(ClaimModel)
ClassWeight = Literal["none", "balanced"]
CLASS_WEIGHTS: tuple[str, ...] = get_args(ClassWeight)
SCORE_COLUMNS = ("user_id", "task_id", "score")
# embed_fn(user_ids, task_query or None) -> (n, d) array
EmbedFn = Callable[[Sequence[str], "str | None"], np.ndarray]


@dataclass
class ProbeConfig:
    """Logistic-regression probe fitted per task on the tune split (StandardScaler, then L2 logistic
    regression whose C is chosen by stratified CV on the tune users, scored by ROC AUC)."""

    # Inverse L2 strengths tried by CV on the TUNE split only. 0.001 joined the grid when CV was found choosing its
    # old edge (0.01) on most tasks: on tune users of worlds 7 and 11 it raised every probe by 0.0005-0.004 AUC and the
    # features' logistic regression by +0.001 / +0.007; adding 0.0001 as well changed nothing (docs/design.md §7.44).
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    cv: int = 3  # stratified folds; each task needs at least this many positives and negatives in tune
    # "none" keeps predict_proba calibrated; AUC/KS are rank metrics, so weighting rarely changes them
    class_weight: ClassWeight = "none"
    max_iter: int = 2000  # lbfgs iterations; standardised inputs converge well inside this
    seed: int = 0  # shuffles the CV folds
    # BLAS/OpenMP threads while fitting; None keeps the caller's limit (one thread inside parallel.fit_map, which
    # runs every per-task fit). Fits here are small, and on a busy machine extra threads cost far more than they
    # save (10-40x slower measured on 2 cores); processes over tasks (`n_jobs`) use the other cores instead.
    n_threads: int | None = 1

    def __post_init__(self) -> None:
        self.Cs = tuple(float(c) for c in self.Cs)
        if not self.Cs or any(not np.isfinite(c) or c <= 0 for c in self.Cs):
            raise ValueError(f"ProbeConfig.Cs must be a non-empty tuple of positive numbers; got {self.Cs!r}")
        if self.cv < 2:
            raise ValueError(f"ProbeConfig.cv must be >= 2 folds; got {self.cv}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"ProbeConfig.class_weight {self.class_weight!r} is not valid; choices: {', '.join(CLASS_WEIGHTS)}")
        if self.max_iter < 1:
            raise ValueError(f"ProbeConfig.max_iter must be >= 1; got {self.max_iter}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"ProbeConfig.n_threads must be >= 1 or None; got {self.n_threads}")


@dataclass
class GBDTConfig:
    """HistGradientBoostingClassifier settings for the feature baseline: modest and fixed (no search),
    with early stopping on a held-out share of the TUNE users."""

    learning_rate: float = 0.05  # shrinkage per tree
    max_iter: int = 400  # most boosting rounds; early stopping usually ends far sooner
    max_leaf_nodes: int = 15  # small trees: a few hundred positives per task do not support deep ones
    min_samples_leaf: int = 20  # users per leaf
    l2_regularization: float = 1.0  # on leaf values
    validation_fraction: float = 0.2  # share of tune users held out (stratified) for early stopping
    n_iter_no_change: int = 30  # rounds without validation-loss gain before stopping
    n_threads: int | None = 1  # OpenMP threads while fitting (None: library default); see ProbeConfig.n_threads

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"GBDTConfig.learning_rate must lie in (0, 1]; got {self.learning_rate}")
        for name in ("max_iter", "n_iter_no_change", "min_samples_leaf"):
            if getattr(self, name) < 1:
                raise ValueError(f"GBDTConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.max_leaf_nodes < 2:
            raise ValueError(f"GBDTConfig.max_leaf_nodes must be >= 2; got {self.max_leaf_nodes}")
        if self.l2_regularization < 0:
            raise ValueError(f"GBDTConfig.l2_regularization must be >= 0; got {self.l2_regularization}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"GBDTConfig.validation_fraction must lie in (0, 1); got {self.validation_fraction}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"GBDTConfig.n_threads must be >= 1 or None; got {self.n_threads}")


@dataclass
class TfidfConfig:
    """The TF-IDF half of the `tfidf_features` baseline: each user's event texts (every modality, the
    feature spec's history window) as one bag of word n-grams, weighted on the TUNE users only, next to
    the standardised hand-crafted features in one logistic regression."""

    ngram_max: int = 2  # word n-grams 1..ngram_max; bigrams keep phrases ("delay repayment") apart from their words
    min_df: int = 5  # a term must occur in this many TUNE users' histories; rarer ones cannot be fitted anyway
    sublinear_tf: bool = True  # 1 + log(tf): forty grocery bills are not forty times the evidence of one
    # The TF-IDF block (rows of unit L2 norm, so tiny per-column values) is rescaled to this share of the
    # standardised features' total variance (see probe_scores' extra block): with one L2 penalty for
    # both, the scale decides how much the text may say. 0.25 came out best of 0.1-1 in 3-fold CV on the
    # tune users of data/world-6000-seed7 (test users not looked at); 1.0 was worst, and choosing the
    # share per task by CV was no better, at three times the fits.
    text_share: float = 0.25
    probe: ProbeConfig | None = None  # C grid, folds, class weight; None: ProbeConfig(seed=seed)

    def __post_init__(self) -> None:
        if isinstance(self.ngram_max, bool) or not isinstance(self.ngram_max, (int, np.integer)) or self.ngram_max < 1:
            raise ValueError(f"TfidfConfig.ngram_max must be an integer >= 1 (1: words only, 2: words and word pairs); got {self.ngram_max!r}")
        if isinstance(self.min_df, bool) or not isinstance(self.min_df, (int, np.integer)) or self.min_df < 1:
            raise ValueError(f"TfidfConfig.min_df must be an integer >= 1 (a count of tune users); got {self.min_df!r}")
        if not isinstance(self.sublinear_tf, bool):
            raise ValueError(f"TfidfConfig.sublinear_tf must be True or False; got {self.sublinear_tf!r}")
        if isinstance(self.text_share, bool) or not isinstance(self.text_share, (int, float)) or not (
            np.isfinite(self.text_share) and self.text_share > 0
        ):
            raise ValueError(
                f"TfidfConfig.text_share must be a finite number > 0 (use feature_scores for features alone); got {self.text_share!r}"
            )
        if self.probe is not None and not isinstance(self.probe, ProbeConfig):
            raise ValueError(f"TfidfConfig.probe must be a ProbeConfig or None; got {type(self.probe).__name__}")


# Shares of the features' variance tried for an embedding fitted beside them (combined_probe_scores),
# from "the features lead" to "the embedding leads"; the probe's CV picks one per task. The 1/16 end
# keeps a weak embedding from costing the features much (a 128-d hashing text embedding: -0.003 AUC
# with it, -0.004 without it, in CV on the tune users of world-6000-seed7); 4 lets a strong one lead.
# Adding 0 (features alone) or picking one share for all tasks did no better: the CV is too noisy.
EMBEDDING_SHARES: tuple[float, ...] = (0.0625, 0.25, 1.0, 4.0)
# How features and an embedding are combined (combined_probe_scores): two probes blended, or one probe over both
Combine = Literal["blend", "one_probe"]
# The embedding probe's weights tried by the blend of blended_probe_scores (0: the features alone, 1: the embedding alone)
BLEND_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------------------------
# shared checks


def _split_ids(tune_users: Sequence[str], test_users: Sequence[str]) -> tuple[list[str], list[str]]:
    tune = string_list(tune_users, "tune_users", allow_empty=False, unique=True)
    test = string_list(test_users, "test_users", allow_empty=False, unique=True)
    both = sorted(set(tune) & set(test))
    if both:
        raise ValueError(f"tune_users and test_users overlap in {len(both)} user(s), e.g. {both[:5]}; a probe must not fit on test users")
    return tune, test


def _check_matrix(X: Any, n_rows: int, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != n_rows:
        raise ValueError(f"{what}: expected a 2-d array with {n_rows} rows; got shape {X.shape}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} row(s) hold NaN or infinite values, e.g. row(s) {np.flatnonzero(bad)[:5].tolist()}")
    return X


def _tune_targets(labels: pd.DataFrame, task_id: str, tune: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (into `tune`) of the tune users labelled for `task_id`, and their labels."""
    sub = labels[labels["task_id"] == task_id]
    y_by_user = dict(zip(sub["user_id"], sub["label"]))
    pos = np.array([i for i, u in enumerate(tune) if u in y_by_user], dtype=np.int64)
    y = np.array([y_by_user[tune[i]] for i in pos], dtype=np.int64)
    return pos, y


def _check_weights(w: Any, n_rows: int, what: str) -> np.ndarray | None:
    """None, or `w` as n_rows finite positive float64 weights (a row of weight 0 belongs out of the fit, so that
    the CV's folds and the class counts see only the rows that count)."""
    if w is None:
        return None
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n_rows,):
        raise ValueError(f"{what}: expected one weight per training row ({n_rows}); got shape {w.shape}")
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        raise ValueError(f"{what}: weights must be finite and > 0 (leave a row out instead of weighting it 0); "
                         f"{int(bad.sum())} are not, e.g. row(s) {np.flatnonzero(bad)[:5].tolist()}")
    return w


def _check_classes(y: np.ndarray, where: str, min_per_class: int) -> None:
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if min(n_pos, n_neg) < min_per_class:
        raise DataValidationError(
            f"{where}: the training rows hold {n_pos} positive and {n_neg} negative labels; "
            f"fitting needs at least {min_per_class} of each"
        )


def _long(task_ids: list[str], test: list[str], per_task: list[np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.tile(np.asarray(test, dtype=object), len(task_ids)),
            "task_id": np.repeat(np.asarray(task_ids, dtype=object), len(test)),
            "score": np.concatenate(per_task) if per_task else np.zeros(0),
        }
    )


# ----------------------------------------------------------------------------------------------
# the probe


def _block(M: Any, n_rows: int, what: str) -> np.ndarray | sp.csr_matrix:
    """A checked 2-d float64 block: scipy sparse stays sparse (as CSR), anything else becomes dense."""
    if not sp.issparse(M):
        return _check_matrix(M, n_rows, what)
    M = sp.csr_matrix(M, dtype=np.float64)
    if M.shape[0] != n_rows:
        raise ValueError(f"{what}: expected a 2-d matrix with {n_rows} rows; got shape {M.shape}")
    if not np.isfinite(M.data).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    return M


def _total_variance(M: np.ndarray | sp.csr_matrix) -> float:
    """Sum of M's column variances (dense or sparse, without densifying)."""
    if sp.issparse(M):
        return float(M.power(2).mean(axis=0).sum() - np.square(np.asarray(M.mean(axis=0))).sum())
    return float(M.var(axis=0).sum())


def _probe_labels(y: np.ndarray, what: str, config: ProbeConfig) -> np.ndarray:
    """`y` as int64 0/1 labels with at least `config.cv` of each class, or an error naming `what`."""
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what} must hold 0/1 labels; found {sorted(set(y.tolist()))[:5]}")
    y = y.astype(np.int64)
    _check_classes(y, "probe", config.cv)
    return y


def _logreg_cv(Z, y: np.ndarray, config: ProbeConfig, sample_weight: np.ndarray | None = None) -> LogisticRegressionCV:
    """The CV-tuned L2 logistic regression of every probe, fitted on (Z, y) (rows weighted by `sample_weight`,
    in the fits and in the folds' AUC, when given)."""
    model = LogisticRegressionCV(
        Cs=list(config.Cs),
        l1_ratios=(0.0,),
        cv=StratifiedKFold(config.cv, shuffle=True, random_state=config.seed),
        scoring="roc_auc",
        class_weight=None if config.class_weight == "none" else "balanced",
        max_iter=config.max_iter,
        use_legacy_attributes=False,
    )
    with threadpool_limits(limits=config.n_threads):
        return model.fit(Z, y, sample_weight=sample_weight)


def _fit_logreg(Z, y: np.ndarray, Zt, config: ProbeConfig,
                sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(best mean CV AUC over config.Cs, P(y=1) for Zt) of the CV-tuned L2 logistic regression."""
    model = _logreg_cv(Z, y, config, sample_weight)
    with threadpool_limits(limits=config.n_threads):
        proba = model.predict_proba(Zt)[:, 1].astype(np.float64)
    return float(model.scores_.mean(axis=0).max()), proba  # scores_: (folds, l1_ratios, Cs)


def fit_linear_probe(X, y, config: ProbeConfig | None = None) -> dict[str, np.ndarray]:
    """The probe of `probe_scores` (StandardScaler + CV-tuned L2 logistic regression) fitted on (X, y), as
    plain arrays, so that P(y=1 | x) = sigmoid(((x - mean) / scale) @ coef + intercept) can be computed
    anywhere (e.g. inside a prompt-tuning adapter, in torch): {"mean", "scale", "coef", "intercept"}."""
    config = config or ProbeConfig()
    y = np.asarray(y)
    X = _check_matrix(X, len(y), "probe X")
    y = _probe_labels(y, "probe y", config)
    scaler = StandardScaler().fit(X)
    model = _logreg_cv(scaler.transform(X), y, config)
    return {"mean": scaler.mean_.astype(np.float32), "scale": scaler.scale_.astype(np.float32),
            "coef": model.coef_.reshape(-1).astype(np.float32), "intercept": model.intercept_.reshape(1).astype(np.float32)}


def probe_scores(
    train_X,
    train_y,
    test_X,
    config: ProbeConfig | None = None,
    *,
    extra_train=None,
    extra_test=None,
    extra_shares: Sequence[float] = (1.0,),
    standardize_extra: bool = True,
    sample_weight=None,
) -> np.ndarray:
    """Fit StandardScaler + CV-tuned L2 logistic regression on (train_X, train_y); P(y=1) for test_X.

    C is chosen among config.Cs by stratified `config.cv`-fold CV on the training rows (ROC AUC), then
    refitted on all of them. Returns an (n_test,) float64 array.

    extra_train / extra_test (both or neither; dense or scipy sparse): a second block of columns fitted
    beside X, e.g. an embedding or a TF-IDF matrix. With one L2 penalty for every column, a block's
    say depends on its width and scale: 250 standardised feature columns drown a 32-d embedding, and
    TF-IDF rows of unit norm are too small to count at all. The extra block is therefore rescaled to
    hold `share` times the total variance of standardised X; each share in `extra_shares` is fitted
    and the one with the best CV AUC is kept (same folds for all, so the choice reads training rows
    only); share 0 means X alone. `standardize_extra` first standardises the extra block on the
    training rows; pass False for a sparse block (centring would densify it, and unit variance would
    blow its rarest columns up).

    `sample_weight`: one positive weight per training row (e.g. how often a bootstrap draw holds the user,
    label_budget.refit_scores), used by the scalers, the fits and the CV's AUC; None weighs every row once."""
    config = config or ProbeConfig()
    y = np.asarray(train_y)
    X = _check_matrix(train_X, len(y), "probe train_X")
    w = _check_weights(sample_weight, len(y), "probe sample_weight")
    Xt = np.asarray(test_X, dtype=np.float64)
    Xt = _check_matrix(Xt, Xt.shape[0] if Xt.ndim == 2 else -1, "probe test_X")
    if Xt.shape[1] != X.shape[1]:
        raise ValueError(f"probe: train_X has {X.shape[1]} columns but test_X has {Xt.shape[1]}")
    if (extra_train is None) != (extra_test is None):
        raise ValueError("probe: give extra_train and extra_test together, or neither")
    y = _probe_labels(y, "probe train_y", config)
    scaler = StandardScaler().fit(X, sample_weight=w)  # on the training rows only, as a pipeline would
    Z, Zt = scaler.transform(X), scaler.transform(Xt)
    if extra_train is None:
        return _fit_logreg(Z, y, Zt, config, w)[1]

    E = _block(extra_train, len(y), "probe extra_train")
    Et = _block(extra_test, len(Xt), "probe extra_test")
    if E.shape[1] != Et.shape[1]:
        raise ValueError(f"probe: extra_train has {E.shape[1]} columns but extra_test has {Et.shape[1]}")
    shares = tuple(extra_shares)
    if not shares or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 for v in shares):
        raise ValueError(f"probe: extra_shares must be a non-empty sequence of numbers >= 0; got {extra_shares!r}")
    if standardize_extra:
        if sp.issparse(E) or sp.issparse(Et):
            raise ValueError("probe: a sparse extra block cannot be standardised (centring densifies it); pass standardize_extra=False")
        extra_scaler = StandardScaler().fit(E, sample_weight=w)
        E, Et = extra_scaler.transform(E), extra_scaler.transform(Et)
    var_x, var_e = _total_variance(Z), _total_variance(E)
    stack = (lambda a, b: sp.hstack([sp.csr_matrix(a), b], format="csr")) if sp.issparse(E) else (lambda a, b: np.hstack([a, b]))
    best: tuple[float, np.ndarray] | None = None
    for share in shares:
        if share == 0:  # X alone: lets the CV fall back to no extra block at all
            fit = _fit_logreg(Z, y, Zt, config, w)
        else:
            # a block constant on the training rows carries nothing; leave its (irrelevant) scale alone
            weight = float(np.sqrt(share * var_x / var_e)) if var_e > 0 and var_x > 0 else 1.0
            fit = _fit_logreg(stack(Z, E * weight), y, stack(Zt, Et * weight), config, w)
        if best is None or fit[0] > best[0]:  # ties keep the earlier share
            best = fit
    return best[1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def blend_min_per_class(config: ProbeConfig, folds: int = 5) -> int:
    """The fewest rows of each class `blended_probe_scores` can work with."""
    return max(folds, -(-config.cv * folds // (folds - 1)))


def fewest_of_a_class(y: np.ndarray) -> int:
    """How many rows the rarer class of 0/1 labels `y` holds."""
    n_pos = int(np.sum(y))
    return min(n_pos, len(y) - n_pos)


def can_blend(y: np.ndarray, config: ProbeConfig) -> bool:
    """Whether labels `y` hold enough of each class to blend two probes out-of-fold (`blend_min_per_class`); where
    they do not, features and an embedding share one probe (`features_with_embedding`)."""
    return fewest_of_a_class(y) >= blend_min_per_class(config)


def features_with_embedding(features, y, features_test, embedding, embedding_test, config: ProbeConfig, *,
                            sample_weight=None, embedding_shares: Sequence[float] = EMBEDDING_SHARES) -> np.ndarray:
    """One task's scores from the features and an embedding together, as the demo's qanchor_plus_features fits
    them: two probes blended (`blended_probe_scores`) where `can_blend`, else one probe over both (the embedding
    as `probe_scores`' extra block, its share of the variance picked by CV from `embedding_shares`)."""
    if can_blend(y, config):
        return blended_probe_scores([features, embedding], y, [features_test, embedding_test], config,
                                    sample_weight=sample_weight)
    return probe_scores(features, y, features_test, config, sample_weight=sample_weight, extra_train=embedding,
                        extra_test=embedding_test, extra_shares=embedding_shares)


def blended_probe_scores(
    train_blocks: Sequence[Any],
    train_y,
    test_blocks: Sequence[Any],
    config: ProbeConfig | None = None,
    *,
    folds: int = 5,
    weights: Sequence[float] = BLEND_WEIGHTS,
    sample_weight=None,
) -> np.ndarray:
    """Two blocks of columns (e.g. the hand-crafted features and an embedding) combined by blending two
    probes: one `probe_scores` probe per block, each with its own CV-chosen C, and the score
    (1 - w) * z(logit of the first) + w * z(logit of the second), z standardising each probe's logits by
    their mean and spread over the rows it was fitted on. w is chosen from `weights` by out-of-fold AUC
    (`folds` stratified folds of the training rows, shuffled by config.seed; mean AUC over the folds, ties
    to the smaller w), so w = 0 (the first block alone)
    and w = 1 (the second alone) stay possible; test rows get the probes refitted on all training rows.
    One probe over the blocks side by side pays for the width of both: next to 282 feature columns, a 128-d
    embedding that beats the features alone scored below itself (docs/design.md §7.10). A free logistic
    stacker over the two logits failed where positives are few (35 of 375): fold-to-fold swings in the
    probes' scale and a negative weight put one task below chance. Returns (n_test,) float64 scores
    (a ranking, not probabilities). `sample_weight` as in `probe_scores`, here also in the folds' AUC and
    the logits' spread."""
    config = config or ProbeConfig()
    y = _probe_labels(np.asarray(train_y), "blended probe train_y", config)
    sw = _check_weights(sample_weight, len(y), "blended probe sample_weight")
    if len(train_blocks) != 2 or len(test_blocks) != 2:
        raise ValueError(f"blended probe: give two train blocks and their two test blocks; got "
                         f"{len(train_blocks)} train and {len(test_blocks)} test blocks")
    if folds < 2:
        raise ValueError(f"blended probe: folds must be >= 2; got {folds}")
    weights = tuple(float(w) for w in weights)
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise ValueError(f"blended probe: weights must be numbers in [0, 1]; got {weights!r}")
    # every held-out fold needs a row of each class, and every fold's probe runs its own config.cv-fold CV
    _check_classes(y, "blended probe", blend_min_per_class(config, folds))
    blocks = [_check_matrix(b, len(y), f"blended probe train block {j}") for j, b in enumerate(train_blocks)]
    tests = [np.asarray(b, dtype=np.float64) for b in test_blocks]

    def scaled_logits(B_fit, y_fit, B_eval, w_fit):
        """The probe's logits for B_eval, in units of its logits' spread over the rows it was fitted on (so that a
        user's score does not depend on who else is scored)."""
        both = _logit(probe_scores(B_fit, y_fit, np.vstack([B_fit, B_eval]), config, sample_weight=w_fit))
        fit, ev = both[:len(B_fit)], both[len(B_fit):]
        if w_fit is None:
            return (ev - fit.mean()) / (fit.std() + 1e-12)
        mean = np.average(fit, weights=w_fit)
        return (ev - mean) / (np.sqrt(np.average((fit - mean) ** 2, weights=w_fit)) + 1e-12)

    part = (lambda rows: None) if sw is None else (lambda rows: sw[rows])  # noqa: E731

    fold_auc = np.zeros((folds, len(weights)))
    split = StratifiedKFold(folds, shuffle=True, random_state=config.seed).split(np.zeros(len(y)), y)
    for f, (fit_rows, held) in enumerate(split):
        a, b = (scaled_logits(B[fit_rows], y[fit_rows], B[held], part(fit_rows)) for B in blocks)  # (held,) each
        fold_auc[f] = [roc_auc_score(y[held], (1 - w) * a + w * b, sample_weight=part(held)) for w in weights]
    w = weights[int(np.argmax(fold_auc.mean(axis=0)))]                  # first (smallest) of the best on ties
    a, b = (scaled_logits(B, y, Bt, sw) for B, Bt in zip(blocks, tests))              # (n_test,) each
    return ((1 - w) * a + w * b).astype(np.float64)


def embedding_probe_scores(
    embed_fn: EmbedFn,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    config: ProbeConfig | None = None,
    *,
    query_dependent: bool = True,
    show_progress: bool = False,
    features: np.ndarray | None = None,
    embedding_shares: Sequence[float] = (1.0,),
    combine: Combine = "blend",
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """One logistic probe per task on tune users' embeddings; scores for every test user.

    With query_dependent (Q-Anchor), embed_fn(tune + test users, task query) is called once per task;
    without it (static embeddings, text embeddings), embed_fn(tune + test users, None) is called once
    and reused for every task. Only tune users' labels are read.

    `features`: optional (len(tune) + len(test), F) columns, rows tune users then test users, fitted
    beside the embedding: `combine="blend"` blends a probe on each (`blended_probe_scores`); "one_probe" fits
    one probe over both, the embedding's share of the variance picked from `embedding_shares` by the probe's
    CV (probe_scores' extra block).

    `n_jobs`: worker processes for the tasks' fits (None: this process; -1: every core); the scores are the
    same for any value (parallel.fit_map)."""
    if combine not in get_args(Combine):
        raise ValueError(f"combine={combine!r}; valid choices: {', '.join(map(repr, get_args(Combine)))}")
    config = config or ProbeConfig()
    tune, test = _split_ids(tune_users, test_users)
    tasks_v = validate_tasks(tasks)
    labels_v = validate_labels(labels, tasks=tasks_v)
    users = tune + test
    if features is not None:
        features = _check_matrix(features, len(users), "features (rows: tune users, then test users)")
    static = None
    if not query_dependent:
        static = _check_matrix(embed_fn(users, None), len(users), "embed_fn(users, None)")
    task_ids = tasks_v["task_id"].tolist()
    fits = []  # (task_id, what, fit, args, kwargs): every check and embed_fn call here, the fits by fit_map
    for task_id, query in zip(task_ids, tasks_v["query"]):
        pos, y = _tune_targets(labels_v, task_id, tune)
        _check_classes(y, f"task {task_id!r} (tune split)", config.cv)
        if features is not None and combine == "blend" and not can_blend(y, config):
            # too few of a class to blend out-of-fold: features_with_embedding falls back to one probe over both
            warnings.warn(f"task {task_id!r}: {int(y.sum())} positive / {int(len(y) - y.sum())} negative tune "
                          f"labels, fewer than the {blend_min_per_class(config)} of each a blend needs; "
                          "features and embedding share one probe for this task", stacklevel=2)
        if static is None:
            emb = _check_matrix(embed_fn(users, query), len(users), f"task {task_id!r}: embed_fn(users, query)")
        else:
            emb = static
        fit_rows, test_rows = _Rows(emb, pos), _Rows(emb, slice(len(tune), None))
        if features is None:
            fits.append((task_id, "", probe_scores, (fit_rows, y, test_rows, config), {}))
        elif combine == "blend":
            fits.append((task_id, "", features_with_embedding, (_Rows(features, pos), y, features[len(tune):],
                                                                fit_rows, test_rows, config),
                         dict(embedding_shares=embedding_shares)))
        else:
            fits.append((task_id, "", probe_scores, (_Rows(features, pos), y, features[len(tune):], config),
                         dict(extra_train=fit_rows, extra_test=test_rows, extra_shares=embedding_shares)))
    per_task = fit_map(_fit_task, fits, n_jobs, desc="probing tasks", show_progress=show_progress)
    return _long(task_ids, test, per_task)


@dataclass(frozen=True)
class _Rows:
    """array[rows], taken only when a task's fit runs: the jobs of a per-task loop share one array (the features
    of every user) instead of holding a copy of its rows per task until the last fit is done."""

    array: Any
    rows: Any  # row indices or a slice

    @staticmethod
    def take(arg: Any) -> Any:
        """arg with every _Rows in it (or in a list or tuple of it) replaced by its rows."""
        if isinstance(arg, _Rows):
            return arg.array[arg.rows]
        if isinstance(arg, (list, tuple)):
            return type(arg)(_Rows.take(a) for a in arg)
        return arg


def _fit_task(task_id: str, what: str, fit: Callable[..., np.ndarray], args: Sequence[Any],
              kwargs: Mapping[str, Any]) -> np.ndarray:
    """fit(*args, **kwargs) for one task, as parallel.fit_map runs it (maybe in a worker process), the _Rows among
    its arguments taken first; a ValueError comes back as a DataValidationError naming the task (and `what`,
    e.g. " (gbdt)")."""
    try:
        return fit(*_Rows.take(tuple(args)), **{k: _Rows.take(v) for k, v in kwargs.items()})
    except ValueError as exc:
        raise DataValidationError(f"task {task_id!r}{what}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# oracle, features, text embedding


def oracle_scores(labels: pd.DataFrame, test_users: Sequence[str]) -> pd.DataFrame:
    """The synthetic world's true P(label=1) as the score: the best any model could rank."""
    test = string_list(test_users, "test_users", allow_empty=False, unique=True)
    labels_v = validate_labels(labels)
    sub = labels_v[labels_v["user_id"].isin(set(test))]
    if sub.empty:
        raise DataValidationError(f"labels: none of the {len(test)} test users has a label")
    nan = sub["oracle_prob"].isna().to_numpy()
    if nan.any():
        bad_tasks = list(dict.fromkeys(sub.loc[nan, "task_id"]))
        raise DataValidationError(
            f"labels: oracle_prob is missing for task(s) {bad_tasks[:5]} ({int(nan.sum())} test rows); "
            "an oracle needs the synthetic world's known probabilities"
        )
    return sub[["user_id", "task_id", "oracle_prob"]].rename(columns={"oracle_prob": "score"}).reset_index(drop=True)


def _world_tables(world: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    for name in ("events", "profiles", "tasks", "labels"):
        if not isinstance(getattr(world, name, None), pd.DataFrame):
            raise TypeError(f"world must carry a DataFrame `{name}` (a schema.World); got {type(world).__name__}")
    tasks_v = validate_tasks(world.tasks)
    return world.events, tasks_v, validate_labels(world.labels, tasks=tasks_v)


def _world_split(world: Any, tune_users: Sequence[str], test_users: Sequence[str]):
    """(tune, test, events, tasks, labels) for a world-reading scorer. Every user must be in
    world.users: a mistyped id would otherwise get all-zero features and a score, silently."""
    tune, test = _split_ids(tune_users, test_users)
    events, tasks_v, labels_v = _world_tables(world)
    users = getattr(world, "users", None)
    if isinstance(users, pd.DataFrame) and "user_id" in users.columns:
        known = set(users["user_id"].astype(str))
        for what, ids in (("tune_users", tune), ("test_users", test)):
            unknown = [u for u in ids if u not in known]
            if unknown:
                raise DataValidationError(f"{what}: {len(unknown)} user id(s) are not in world.users, e.g. {unknown[:5]}")
    return tune, test, events, tasks_v, labels_v


def _feature_matrix(world: Any, users: list[str], feature_spec: Any = None) -> tuple[Any, np.ndarray]:
    """(spec, features): the hand-crafted features of `users` (rows in that order), standardised by a
    FeatureSpec fitted on the world's pre-training users unless `feature_spec` is given. Every
    feature-based scorer goes through here, so all see the same numbers."""
    feature_spec = _world_feature_spec(world, feature_spec)
    X = feature_spec.transform(world.events, world.profiles, users, standardize=True).astype(np.float64)
    return feature_spec, X


def _world_feature_spec(world: Any, feature_spec: Any = None) -> Any:
    """`feature_spec`, or a FeatureSpec fitted on the world's pre-training users: the dataset's declared modalities
    and history window, which every baseline reads its users' events through."""
    from qanchor_lab.features import FeatureSpec

    if feature_spec is not None:
        return feature_spec
    ref = world.users_in("pretrain")
    if not ref:
        raise DataValidationError("world has no 'pretrain' users to fit the feature spec on; pass feature_spec")
    return FeatureSpec.fit_world(world, ref)


def _fit_gbdt(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, gbdt: GBDTConfig, seed: int) -> np.ndarray:
    model = HistGradientBoostingClassifier(
        learning_rate=gbdt.learning_rate,
        max_iter=gbdt.max_iter,
        max_leaf_nodes=gbdt.max_leaf_nodes,
        min_samples_leaf=gbdt.min_samples_leaf,
        l2_regularization=gbdt.l2_regularization,
        early_stopping=True,
        validation_fraction=gbdt.validation_fraction,
        n_iter_no_change=gbdt.n_iter_no_change,
        scoring="loss",
        random_state=seed,
    )
    with threadpool_limits(limits=gbdt.n_threads):
        model.fit(X, y)
        return model.predict_proba(Xt)[:, 1].astype(np.float64)


def feature_scores(
    world: Any,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    model: FeatureModel,
    seed: int = 0,
    feature_spec: Any = None,
    probe: ProbeConfig | None = None,
    gbdt: GBDTConfig | None = None,
    show_progress: bool = False,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Hand-crafted features (features.FeatureSpec, fitted on the world's pre-training users unless
    `feature_spec` is given) -> one model per task: GBDT (`gbdt` settings, random_state=seed) or the
    logistic probe (`probe` settings, CV folds shuffled by seed). `n_jobs`: worker processes for the tasks'
    fits, as in embedding_probe_scores."""
    if model not in FEATURE_MODELS:
        raise ValueError(f"unknown feature model {model!r}; valid choices: {', '.join(FEATURE_MODELS)}")
    tune, test, _, tasks_v, labels_v = _world_split(world, tune_users, test_users)
    _, X_all = _feature_matrix(world, tune + test, feature_spec)
    X_tune, X_test = X_all[: len(tune)], X_all[len(tune):]
    probe = probe or ProbeConfig(seed=seed)
    gbdt = gbdt or GBDTConfig()
    task_ids = tasks_v["task_id"].tolist()
    fits = []
    for task_id in task_ids:
        pos, y = _tune_targets(labels_v, task_id, tune)
        if model == "gbdt":
            # early stopping holds out a stratified share (scikit-learn's split needs two of each class; the
            # validation loss is read whatever classes the held-out share holds)
            _check_classes(y, f"task {task_id!r} (tune split)", 2)
            fits.append((task_id, " (gbdt)", _fit_gbdt, (_Rows(X_tune, pos), y, X_test, gbdt, seed), {}))
        else:
            _check_classes(y, f"task {task_id!r} (tune split)", probe.cv)
            fits.append((task_id, " (logreg)", probe_scores, (_Rows(X_tune, pos), y, X_test, probe), {}))
    per_task = fit_map(_fit_task, fits, n_jobs, desc=f"features + {model}", show_progress=show_progress)
    return _long(task_ids, test, per_task)


def _user_term_counts(events: pd.DataFrame, users: list[str], spec: Any, ngram_max: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(counts, terms): how often each word n-gram occurs in each user's event texts (all modalities)
    inside the feature spec's history window, so text and features describe the same days.

    N-grams are taken per event text, so a bigram never spans two events. Event texts repeat heavily
    (a few hundred distinct ones), so each distinct text is tokenised once: counts = (user x text
    occurrences) @ (text x n-gram counts)."""
    from qanchor_lab.features import _clean_events, events_in_window

    ev = events_in_window(_clean_events(events, ["user_id", "timestamp", "text"]), spec.window)  # naive timestamps
    uidx = pd.Index(users).get_indexer(ev["user_id"])
    keep = uidx >= 0
    codes, texts = pd.factorize(ev["text"].to_numpy()[keep])
    occurrences = sp.csr_matrix(
        (np.ones(len(codes)), (uidx[keep], codes)), shape=(len(users), len(texts))
    )  # (U, distinct texts)
    vectorizer = CountVectorizer(ngram_range=(1, ngram_max), lowercase=True, dtype=np.float64)
    try:
        per_text = vectorizer.fit_transform(list(texts))  # (distinct texts, V)
    except ValueError as exc:  # no event at all, or not one word of two letters
        raise DataValidationError(f"tfidf: the users' event texts hold no words to count ({exc})") from None
    return (occurrences @ per_text).tocsr(), vectorizer.get_feature_names_out()


def tfidf_feature_scores(
    world: Any,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    seed: int = 0,
    config: TfidfConfig | None = None,
    feature_spec: Any = None,
    show_progress: bool = False,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """A practitioner's strong baseline for text-rich logs: the hand-crafted features (as
    `feature_scores` uses them) next to a TF-IDF bag of each user's event texts, one CV-tuned logistic
    regression per task.

    The features catch counts, amounts and timing but not what a search says ("ways to delay credit
    card repayment") nor which rare merchant a bill went to (pooled into "other"); the text bag does.
    Vocabulary (min_df), idf and the block's scale are fitted on the TUNE users only; test users are
    only transformed. Features are standardised on each task's tune rows as in the probe; the TF-IDF
    block joins them sparse, scaled as a whole (TfidfConfig.text_share). C is chosen per task by
    stratified CV on the tune users (folds shuffled by `seed`). `n_jobs`: worker processes for the tasks' fits,
    as in embedding_probe_scores."""
    config = config or TfidfConfig()
    probe = config.probe or ProbeConfig(seed=seed)
    tune, test, events, tasks_v, labels_v = _world_split(world, tune_users, test_users)
    if "text" not in events.columns:
        raise DataValidationError(f"tfidf: world.events has no 'text' column to read; it has {list(events.columns)}")
    users = tune + test
    spec, X_all = _feature_matrix(world, users, feature_spec)
    X_tune, X_test = X_all[: len(tune)], X_all[len(tune):]

    counts, terms = _user_term_counts(events, users, spec, config.ngram_max)
    n_tune = len(tune)
    doc_freq = np.asarray((counts[:n_tune] > 0).sum(axis=0)).ravel()  # (V,) tune users using each term
    kept = np.flatnonzero(doc_freq >= config.min_df)
    if not len(kept):
        raise DataValidationError(
            f"tfidf: no term occurs in {config.min_df} or more tune users' event texts "
            f"({len(terms)} terms in all, at most {int(doc_freq.max(initial=0))} users each); lower TfidfConfig.min_df"
        )
    counts = counts[:, kept]
    tfidf = TfidfTransformer(norm="l2", sublinear_tf=config.sublinear_tf).fit(counts[:n_tune])
    T = tfidf.transform(counts).tocsr()  # (U, V'), rows of unit norm (zero for users without text)
    T_tune, T_test = T[:n_tune], T[n_tune:]

    task_ids = tasks_v["task_id"].tolist()
    fits = []
    for task_id in task_ids:
        pos, y = _tune_targets(labels_v, task_id, tune)
        _check_classes(y, f"task {task_id!r} (tune split)", probe.cv)
        fits.append((task_id, " (tfidf)", probe_scores, (_Rows(X_tune, pos), y, X_test, probe),
                     dict(extra_train=_Rows(T_tune, pos), extra_test=T_test, extra_shares=(config.text_share,),
                          standardize_extra=False)))
    per_task = fit_map(_fit_task, fits, n_jobs, desc="features + TF-IDF", show_progress=show_progress)
    return _long(task_ids, test, per_task)


def combined_probe_scores(
    embed_fn: EmbedFn,
    world: Any,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    seed: int = 0,
    feature_spec: Any = None,
    probe: ProbeConfig | None = None,
    embedding_shares: Sequence[float] = EMBEDDING_SHARES,
    query_dependent: bool = True,
    show_progress: bool = False,
    combine: Combine = "blend",
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """The hand-crafted features and a user embedding together, the way a team would deploy an
    embedding: next to the features it already has, not instead of them.

    `combine="blend"` (default): a probe on the features and a probe on the embedding, blended with a weight
    chosen by out-of-fold AUC (`blended_probe_scores`). On tune users of the default world (70% fit, 30%
    scored) it scored 0.733 against 0.717 for one probe over both and 0.726 for the
    embedding alone (docs/design.md §7.10). "one_probe": the earlier combination, described next.

    The features (as `feature_scores` computes them) and embed_fn's output are each standardised and
    fitted in one CV-tuned logistic regression per task: `embedding_probe_scores` with `features`, so
    calls to embed_fn follow `query_dependent` as there. The embedding block's share of the variance is
    picked per task by the same CV from `embedding_shares`: in a plain hstack the wider block wins, and
    next to the 250 feature columns an embedding of the latent traits that beat the features on its
    own (avg AUC 0.756 vs 0.700, 1500-user test world) scored below itself (0.731; with the shares:
    0.759). Only tune users' labels are read."""
    tune, test, _, tasks_v, labels_v = _world_split(world, tune_users, test_users)
    _, X_all = _feature_matrix(world, tune + test, feature_spec)
    return embedding_probe_scores(
        embed_fn, tune, test, labels_v, tasks_v, probe or ProbeConfig(seed=seed),
        query_dependent=query_dependent, show_progress=show_progress,
        features=X_all, embedding_shares=embedding_shares, combine=combine, n_jobs=n_jobs,
    )


def _uncached(encoder: Any) -> Any:
    """The encoder itself, minus any on-disk text cache: serialised users are unique texts, so
    caching them only fills the disk."""
    from qanchor_lab.event_encoder import CachedTextEncoder, MiniLMEncoder

    if encoder is None:
        return MiniLMEncoder()
    if isinstance(encoder, CachedTextEncoder):
        return encoder.encoder
    if not callable(getattr(encoder, "encode", None)):
        raise TypeError(f"encoder must have an encode(texts) -> (n, d) array method; got {type(encoder).__name__}")
    return encoder


def encode_texts(
    encoder: Any, texts: Sequence[str], *, batch_size: int = 256, desc: str = "encoding users", show_progress: bool = True
) -> np.ndarray:
    """encoder.encode over `texts` in batches with a tqdm bar; (n, d) float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    out = []
    with tqdm(total=len(texts), desc=desc, unit="user", disable=not show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            vecs = np.asarray(encoder.encode(chunk), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(chunk):
                raise ValueError(f"encoder {getattr(encoder, 'name', type(encoder).__name__)!r} returned shape {vecs.shape} for {len(chunk)} texts")
            out.append(vecs)
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def text_embedding_vectors(world: Any, users: Sequence[str], *, encoder: Any = None, batch_size: int = 256,
                           serialize_kw: Mapping[str, Any] | None = None, show_progress: bool = True,
                           feature_spec: Any = None) -> np.ndarray:
    """(len(users), dim) text embeddings of users' behaviour: their events in the history window of `feature_spec`
    (by default fitted on the world's pre-training users, as every feature baseline's), serialised as text
    (features.serialize_users, with `serialize_kw`: max_events_per_modality, max_chars) and embedded by MiniLM (or
    `encoder`, without its disk cache). The torch half of text_embedding_scores, which the demo runs beside its
    other stages."""
    from qanchor_lab.features import serialize_users

    window = _world_feature_spec(world, feature_spec).window  # a later (label) window's events stay out, as elsewhere
    texts = serialize_users(world.events, world.profiles, list(users), window=window,
                            **{"modalities": world.modality_specs, **(serialize_kw or {})})  # declared units and titles
    return encode_texts(_uncached(encoder), texts, batch_size=batch_size, desc="text-embedding users",
                        show_progress=show_progress)


def text_embedding_scores(
    world: Any,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    encoder: Any = None,
    seed: int = 0,
    probe: ProbeConfig | None = None,
    batch_size: int = 256,
    serialize_kw: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    n_jobs: int | None = None,
    vectors: np.ndarray | None = None,
    feature_spec: Any = None,
) -> pd.DataFrame:
    """The paper's general-purpose text-embedding baseline: each user's behaviour in the history window serialised
    as text and embedded by MiniLM (text_embedding_vectors; `feature_spec` as there), then the logistic probe per
    task. `vectors`: those embeddings, already computed for tune + test users in that order (encoder, batch_size,
    serialize_kw and feature_spec are then unused).
    `n_jobs`: worker processes for the tasks' probes, as in embedding_probe_scores."""
    tune, test, _, tasks_v, labels_v = _world_split(world, tune_users, test_users)
    users = tune + test
    if vectors is None:
        vectors = text_embedding_vectors(world, users, encoder=encoder, batch_size=batch_size,
                                         serialize_kw=serialize_kw, show_progress=show_progress,
                                         feature_spec=feature_spec)
    elif len(vectors) != len(users):
        raise ValueError(f"text embedding: {len(vectors)} vectors given for {len(users)} tune + test users")

    def embed(user_ids: Sequence[str], query: str | None) -> np.ndarray:
        if list(user_ids) != users:
            raise ValueError("text embedding: embed_fn was called with users other than tune + test")
        return vectors

    return embedding_probe_scores(
        embed, tune, test, labels_v, tasks_v, probe or ProbeConfig(seed=seed), query_dependent=False, n_jobs=n_jobs
    )


# ----------------------------------------------------------------------------------------------
# claim classifiers: the diagnostics' yardstick and probes, one fit per QA intent (here, in a torch-free module,
# so that parallel.fit_map's workers start in ~2 s)


def claim_predictions(kind: ClaimModel, X: np.ndarray, y: np.ndarray, Xt: np.ndarray, seed: int = 0) -> np.ndarray:
    """The claims a classifier fitted on (X, y) predicts for Xt (an object array; y's only claim when it has one):
    "logreg" (L2 logistic regression, C=1) or "gbdt" (a few shallow boosting rounds), the yardstick's readers of
    the tabular input; "probe" (standardised, then logistic regression, C=1), the selectivity probe of an
    embedding."""
    if kind not in CLAIM_MODELS:
        raise ValueError(f"unknown claim classifier {kind!r}; valid choices: {', '.join(CLAIM_MODELS)}")
    if len(set(y)) < 2:
        return np.full(len(Xt), y[0], dtype=object)
    if kind == "logreg":
        clf = LogisticRegression(C=1.0, max_iter=500)
    elif kind == "probe":
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    else:
        # few, shallow rounds: a multi-class fit grows one tree per claim per round, and intents have up to
        # ~25 claims but only a few hundred rows
        clf = HistGradientBoostingClassifier(max_iter=30, learning_rate=0.15, max_leaf_nodes=15, min_samples_leaf=10,
                                             early_stopping=False, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.asarray(clf.fit(X, y).predict(Xt), dtype=object)


def claim_predictions_oof(kind: ClaimModel, X_fit: np.ndarray, y_fit: np.ndarray, X_scored: np.ndarray,
                          y_scored: np.ndarray, seed: int, min_fit_rows: int) -> np.ndarray:
    """claim_predictions for the scored rows, fitted on the fit rows; when there are fewer than `min_fit_rows` of
    them, out-of-fold predictions instead (3-fold CV over fit and scored rows together, shuffled by `seed`)."""
    if len(y_fit) >= min_fit_rows:
        return claim_predictions(kind, X_fit, y_fit, X_scored, seed)
    X = np.concatenate([X_fit, X_scored])
    y = np.concatenate([y_fit, y_scored])
    pred = np.empty(len(y), dtype=object)
    k = min(3, len(y))
    if k < 2:
        pred[:] = y[0]
    else:
        for a, b in KFold(k, shuffle=True, random_state=seed).split(X):
            pred[b] = claim_predictions(kind, X[a], y[a], X[b], seed)
    return pred[len(y_fit):]
