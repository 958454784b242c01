//! Verification metrics over scored pairs. Pure functions, no model.
//!
//! Conventions used everywhere here (and by the service): a pair is *accepted*
//! ("same person") when `score >= threshold`. Candidate thresholds are the
//! midpoints between consecutive distinct scores plus one threshold below all
//! scores (accept everything) and one above (reject everything), so every
//! distinct decision rule on the data is represented exactly once and no
//! candidate sits on a score. Where several thresholds tie on accuracy, the
//! lowest is taken, as `argmax` does in the common LFW evaluation scripts and
//! in models/pairs.py, so the figures here and there agree.

use serde::Serialize;

/// Margin that puts the two outer candidate thresholds clearly outside the
/// scores (cosine scores live in [-1, 1], so -2 or 2 read as "accept all" and
/// "reject all" in a report).
const OUTER_MARGIN: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scored {
    pub score: f64,
    /// Ground truth: both images show the same person.
    pub same: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("no pairs to evaluate")]
    Empty,
    #[error("pair {index} has a non-finite score ({score})")]
    NonFinite { index: usize, score: f64 },
    #[error("pair {index} is in fold {fold}, but there are only {folds} folds")]
    FoldOutOfRange {
        index: usize,
        fold: usize,
        folds: usize,
    },
    #[error("fold {0} has no pairs")]
    EmptyFold(usize),
    #[error("cross-validation needs at least 2 folds, got {0}")]
    TooFewFolds(usize),
    #[error(
        "the pairs need both matched and mismatched examples ({pos} matched, {neg} mismatched)"
    )]
    OneClass { pos: usize, neg: usize },
}

/// Rejects empty input and NaN/infinite scores, which would make every
/// ordering-based metric meaningless.
pub fn validate(pairs: &[Scored]) -> Result<(), MetricsError> {
    if pairs.is_empty() {
        return Err(MetricsError::Empty);
    }
    for (index, p) in pairs.iter().enumerate() {
        if !p.score.is_finite() {
            return Err(MetricsError::NonFinite {
                index,
                score: p.score,
            });
        }
    }
    Ok(())
}

fn class_counts(pairs: &[Scored]) -> (usize, usize) {
    let pos = pairs.iter().filter(|p| p.same).count();
    (pos, pairs.len() - pos)
}

fn require_both_classes(pairs: &[Scored]) -> Result<(usize, usize), MetricsError> {
    validate(pairs)?;
    let (pos, neg) = class_counts(pairs);
    if pos == 0 || neg == 0 {
        return Err(MetricsError::OneClass { pos, neg });
    }
    Ok((pos, neg))
}

/// Fraction of pairs decided correctly at `threshold`.
pub fn accuracy_at(pairs: &[Scored], threshold: f64) -> f64 {
    if pairs.is_empty() {
        return 0.0;
    }
    let correct = pairs
        .iter()
        .filter(|p| (p.score >= threshold) == p.same)
        .count();
    correct as f64 / pairs.len() as f64
}

/// Distinct scores, ascending, each with how many matched and mismatched
/// pairs have exactly that score.
struct Groups {
    scores: Vec<f64>,
    pos: Vec<usize>,
    neg: Vec<usize>,
}

fn groups(pairs: &[Scored]) -> Groups {
    let mut sorted: Vec<Scored> = pairs.to_vec();
    sorted.sort_by(|a, b| a.score.total_cmp(&b.score));
    let mut g = Groups {
        scores: Vec::new(),
        pos: Vec::new(),
        neg: Vec::new(),
    };
    for p in sorted {
        if g.scores.last() != Some(&p.score) {
            g.scores.push(p.score);
            g.pos.push(0);
            g.neg.push(0);
        }
        let last = g.scores.len() - 1;
        if p.same {
            g.pos[last] += 1;
        } else {
            g.neg[last] += 1;
        }
    }
    g
}

/// Candidate threshold `i` of `scores.len() + 1`, ascending: 0 accepts every
/// pair, `i` rejects exactly the `i` lowest distinct scores.
fn candidate(scores: &[f64], i: usize) -> f64 {
    let n = scores.len();
    if i == 0 {
        scores[0] - OUTER_MARGIN
    } else if i == n {
        scores[n - 1] + OUTER_MARGIN
    } else {
        // Halves first: the midpoint of two huge finite values must not overflow.
        scores[i - 1] / 2.0 + scores[i] / 2.0
    }
}

/// All candidate thresholds for these scores, ascending (see the module notes).
pub fn candidate_thresholds(pairs: &[Scored]) -> Vec<f64> {
    if pairs.is_empty() {
        return Vec::new();
    }
    let g = groups(pairs);
    (0..=g.scores.len())
        .map(|i| candidate(&g.scores, i))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThresholdChoice {
    pub threshold: f64,
    pub accuracy: f64,
}

/// The accuracy-maximising candidate threshold (lowest among ties), by one
/// sweep over the sorted scores.
pub fn best_threshold(pairs: &[Scored]) -> Result<ThresholdChoice, MetricsError> {
    validate(pairs)?;
    let g = groups(pairs);
    let (pos, _) = class_counts(pairs);
    // Candidate 0 accepts everything: exactly the matched pairs are right.
    let mut correct = pos as i64;
    let mut best = (correct, 0usize);
    for i in 0..g.scores.len() {
        // Moving past distinct score i rejects its pairs.
        correct += g.neg[i] as i64 - g.pos[i] as i64;
        if correct > best.0 {
            best = (correct, i + 1);
        }
    }
    Ok(ThresholdChoice {
        threshold: candidate(&g.scores, best.1),
        accuracy: best.0 as f64 / pairs.len() as f64,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoldResult {
    /// 1-based, as folds are numbered in the pairs file.
    pub fold: usize,
    pub pairs: usize,
    /// Chosen on the other folds only.
    pub threshold: f64,
    /// Accuracy of that threshold on the other folds.
    pub train_accuracy: f64,
    /// Accuracy of that threshold on this (held-out) fold.
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrossValidation {
    pub folds: Vec<FoldResult>,
    /// Mean of the held-out fold accuracies.
    pub mean: f64,
    /// Population standard deviation of the fold accuracies (numpy's
    /// `np.std`, as in the common LFW evaluation scripts).
    pub std: f64,
}

/// k-fold cross-validated accuracy: for each fold, the threshold is chosen on
/// the other folds and tested on it. `fold_of[i]` is pair i's fold in `0..k`.
pub fn cross_validate(
    pairs: &[Scored],
    fold_of: &[usize],
    k: usize,
) -> Result<CrossValidation, MetricsError> {
    validate(pairs)?;
    assert_eq!(pairs.len(), fold_of.len(), "one fold index per pair");
    if k < 2 {
        return Err(MetricsError::TooFewFolds(k));
    }
    if let Some((index, &fold)) = fold_of.iter().enumerate().find(|(_, &f)| f >= k) {
        return Err(MetricsError::FoldOutOfRange {
            index,
            fold,
            folds: k,
        });
    }
    let mut sizes = vec![0usize; k];
    for &f in fold_of {
        sizes[f] += 1;
    }
    if let Some(empty) = sizes.iter().position(|&n| n == 0) {
        return Err(MetricsError::EmptyFold(empty + 1));
    }
    let mut folds = Vec::with_capacity(k);
    for fold in 0..k {
        let (mut test, mut train) = (Vec::new(), Vec::new());
        for (p, &f) in pairs.iter().zip(fold_of) {
            if f == fold {
                test.push(*p);
            } else {
                train.push(*p);
            }
        }
        let chosen = best_threshold(&train)?;
        folds.push(FoldResult {
            fold: fold + 1,
            pairs: test.len(),
            threshold: chosen.threshold,
            train_accuracy: chosen.accuracy,
            accuracy: accuracy_at(&test, chosen.threshold),
        });
    }
    let mean = folds.iter().map(|f| f.accuracy).sum::<f64>() / k as f64;
    let var = folds
        .iter()
        .map(|f| (f.accuracy - mean).powi(2))
        .sum::<f64>()
        / k as f64;
    Ok(CrossValidation {
        folds,
        mean,
        std: var.sqrt(),
    })
}

/// Exact ROC AUC by the rank statistic (Mann-Whitney U): the probability that
/// a random matched pair outscores a random mismatched one, ties counting 1/2.
pub fn roc_auc(pairs: &[Scored]) -> Result<f64, MetricsError> {
    let (pos, neg) = require_both_classes(pairs)?;
    let g = groups(pairs);
    // Average 1-based rank of each tie group, summed over its matched pairs.
    let mut rank_sum_pos = 0.0f64;
    let mut seen = 0usize;
    for i in 0..g.scores.len() {
        let size = g.pos[i] + g.neg[i];
        let avg_rank = seen as f64 + (size as f64 + 1.0) / 2.0;
        rank_sum_pos += avg_rank * g.pos[i] as f64;
        seen += size;
    }
    let (p, n) = (pos as f64, neg as f64);
    Ok((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * n))
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RocPoint {
    pub threshold: f64,
    /// False accept rate: accepted mismatched pairs / mismatched pairs.
    pub far: f64,
    /// True accept rate: accepted matched pairs / matched pairs.
    pub tar: f64,
}

/// The empirical ROC: one point per candidate threshold, from "reject all"
/// (0, 0) down to "accept all" (1, 1); FAR and TAR never decrease along it.
pub fn roc_curve(pairs: &[Scored]) -> Result<Vec<RocPoint>, MetricsError> {
    let (pos, neg) = require_both_classes(pairs)?;
    let g = groups(pairs);
    let n = g.scores.len();
    let mut points = Vec::with_capacity(n + 1);
    let (mut tp, mut fp) = (0usize, 0usize);
    points.push(RocPoint {
        threshold: candidate(&g.scores, n),
        far: 0.0,
        tar: 0.0,
    });
    for i in (0..n).rev() {
        tp += g.pos[i];
        fp += g.neg[i];
        points.push(RocPoint {
            threshold: candidate(&g.scores, i),
            far: fp as f64 / neg as f64,
            tar: tp as f64 / pos as f64,
        });
    }
    Ok(points)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Eer {
    /// The rate at which FAR equals FRR (= 1 - TAR).
    pub eer: f64,
    pub threshold: f64,
}

/// Equal error rate, where the empirical ROC (straight segments between its
/// points) crosses FAR = FRR; the threshold is interpolated the same way.
pub fn eer(roc: &[RocPoint]) -> Option<Eer> {
    // g = FAR - FRR rises from -1 at "reject all" to +1 at "accept all".
    let g = |p: &RocPoint| p.far + p.tar - 1.0;
    let k = roc.iter().position(|p| g(p) >= 0.0)?;
    let hi = roc[k];
    if g(&hi) == 0.0 || k == 0 {
        return Some(Eer {
            eer: hi.far,
            threshold: hi.threshold,
        });
    }
    let lo = roc[k - 1];
    let t = -g(&lo) / (g(&hi) - g(&lo));
    Some(Eer {
        eer: lo.far + t * (hi.far - lo.far),
        threshold: lo.threshold + t * (hi.threshold - lo.threshold),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TarAtFar {
    pub target_far: f64,
    /// The highest TAR of any threshold whose FAR is at most the target.
    pub tar: f64,
    /// The FAR actually reached there (at most the target).
    pub far: f64,
    pub threshold: f64,
    /// The target is finer than one mismatched pair: the point is "no false
    /// accepts at all" and the figure says little about the target rate.
    pub below_resolution: bool,
}

/// TAR at a FAR target: the ROC point with the highest TAR among those with
/// FAR <= target (the highest threshold among ties).
pub fn tar_at_far(roc: &[RocPoint], target_far: f64, mismatched: usize) -> Option<TarAtFar> {
    let mut best: Option<RocPoint> = None;
    for p in roc.iter().filter(|p| p.far <= target_far) {
        if best.is_none_or(|b| p.tar > b.tar) {
            best = Some(*p);
        }
    }
    best.map(|p| TarAtFar {
        target_far,
        tar: p.tar,
        far: p.far,
        threshold: p.threshold,
        below_resolution: (mismatched as f64) * target_far < 1.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn s(score: f64, same: bool) -> Scored {
        Scored { score, same }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // ---- hand-computed cases ----

    #[test]
    fn candidates_are_outer_and_midpoints() {
        let p = [s(0.5, true), s(0.1, false), s(0.3, true), s(0.3, false)];
        let c = candidate_thresholds(&p);
        assert_eq!(c.len(), 4);
        assert!(close(c[0], 0.1 - 1.0));
        assert!(close(c[1], 0.2));
        assert!(close(c[2], 0.4));
        assert!(close(c[3], 0.5 + 1.0));
    }

    #[test]
    fn best_threshold_hand_case() {
        // Sorted: 0.1 N, 0.2 N, 0.4 P, 0.6 N, 0.8 P. Correct counts per
        // candidate: -0.9:2, 0.15:3, 0.3:4, 0.5:3, 0.7:4, 1.8:3.
        // 0.3 and 0.7 tie at 4/5: the lower one wins.
        let p = [
            s(0.8, true),
            s(0.1, false),
            s(0.6, false),
            s(0.4, true),
            s(0.2, false),
        ];
        let b = best_threshold(&p).unwrap();
        assert!(close(b.threshold, 0.3), "{b:?}");
        assert!(close(b.accuracy, 0.8));
        assert!(close(accuracy_at(&p, 0.3), 0.8));
        assert!(close(accuracy_at(&p, 0.5), 0.6));
    }

    #[test]
    fn best_threshold_perfect_separation_and_single_class() {
        let p = [s(0.9, true), s(0.7, true), s(0.2, false), s(-0.1, false)];
        let b = best_threshold(&p).unwrap();
        assert!(close(b.threshold, 0.45));
        assert!(close(b.accuracy, 1.0));
        // All mismatched: "reject all" (the top candidate) is perfect.
        let n = [s(0.3, false), s(0.6, false)];
        let b = best_threshold(&n).unwrap();
        assert!(close(b.threshold, 1.6));
        assert!(close(b.accuracy, 1.0));
        // All matched: only "accept all" is perfect.
        let m = [s(0.3, true), s(0.6, true)];
        let b = best_threshold(&m).unwrap();
        assert!(close(b.threshold, -0.7));
        assert!(close(b.accuracy, 1.0));
    }

    #[test]
    fn ties_in_scores_are_decided_together() {
        // A matched and a mismatched pair with the same score can never be
        // split: the best rule gets exactly one of them right.
        let p = [s(0.5, true), s(0.5, false)];
        let b = best_threshold(&p).unwrap();
        assert!(close(b.accuracy, 0.5));
    }

    #[test]
    fn cross_validation_hand_case() {
        // Fold 1: P 0.9, P 0.5, N 0.4, N 0.1. Fold 2: P 0.8, P 0.3, N 0.6, N 0.2.
        let p = [
            s(0.9, true),
            s(0.5, true),
            s(0.4, false),
            s(0.1, false),
            s(0.8, true),
            s(0.3, true),
            s(0.6, false),
            s(0.2, false),
        ];
        let folds = [0, 0, 0, 0, 1, 1, 1, 1];
        let cv = cross_validate(&p, &folds, 2).unwrap();
        // Train on fold 2 (sorted 0.2N 0.3P 0.6N 0.8P): correct per candidate
        // -0.8:2, 0.25:3, 0.45:2, 0.7:3, 1.8:2 -> 0.25 (lowest of the ties),
        // train accuracy 3/4. On fold 1 at 0.25: 0.9P, 0.5P, 0.1N right, 0.4N wrong.
        assert!(close(cv.folds[0].threshold, 0.25));
        assert!(close(cv.folds[0].train_accuracy, 0.75));
        assert!(close(cv.folds[0].accuracy, 0.75));
        // Train on fold 1: perfectly separated at 0.45, train accuracy 1.
        // On fold 2 at 0.45: 0.8P ok, 0.3P wrong, 0.6N wrong, 0.2N ok.
        assert!(close(cv.folds[1].threshold, 0.45));
        assert!(close(cv.folds[1].train_accuracy, 1.0));
        assert!(close(cv.folds[1].accuracy, 0.5));
        assert!(close(cv.mean, 0.625));
        assert!(close(cv.std, 0.125));
        assert_eq!(cv.folds[0].fold, 1);
        assert_eq!(cv.folds[1].pairs, 4);
    }

    #[test]
    fn cross_validation_rejects_bad_folds() {
        let p = [s(0.1, true), s(0.2, false)];
        assert_eq!(
            cross_validate(&p, &[0, 0], 1),
            Err(MetricsError::TooFewFolds(1))
        );
        assert_eq!(
            cross_validate(&p, &[0, 0], 2),
            Err(MetricsError::EmptyFold(2))
        );
        assert!(matches!(
            cross_validate(&p, &[0, 3], 2),
            Err(MetricsError::FoldOutOfRange { fold: 3, .. })
        ));
    }

    #[test]
    fn auc_hand_cases() {
        // P {0.9, 0.4}, N {0.5, 0.1}: of the 4 (P, N) pairs, 3 are ordered right.
        let p = [s(0.9, true), s(0.4, true), s(0.5, false), s(0.1, false)];
        assert!(close(roc_auc(&p).unwrap(), 0.75));
        // A tie counts one half: P {0.5}, N {0.5, 0.2} -> (0.5 + 1) / 2.
        let t = [s(0.5, true), s(0.5, false), s(0.2, false)];
        assert!(close(roc_auc(&t).unwrap(), 0.75));
        // Perfectly wrong ordering.
        let w = [s(0.1, true), s(0.9, false)];
        assert!(close(roc_auc(&w).unwrap(), 0.0));
        assert!(matches!(
            roc_auc(&[s(0.1, true)]),
            Err(MetricsError::OneClass { pos: 1, neg: 0 })
        ));
    }

    #[test]
    fn roc_hand_case() {
        let p = [s(0.9, true), s(0.4, true), s(0.5, false), s(0.1, false)];
        let roc = roc_curve(&p).unwrap();
        let pts: Vec<(f64, f64)> = roc.iter().map(|r| (r.far, r.tar)).collect();
        assert_eq!(
            pts,
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert!(close(roc[1].threshold, 0.7));
        assert!(close(roc[2].threshold, 0.45));
        assert!(close(roc[4].threshold, 0.1 - 1.0));
    }

    #[test]
    fn eer_hand_cases() {
        // The ROC above passes through (0.5, 0.5): FAR = FRR = 0.5 exactly,
        // first reached at threshold 0.45.
        let p = [s(0.9, true), s(0.4, true), s(0.5, false), s(0.1, false)];
        let e = eer(&roc_curve(&p).unwrap()).unwrap();
        assert!(close(e.eer, 0.5));
        assert!(close(e.threshold, 0.45));
        // P {0.9, 0.8, 0.3}, N {0.6, 0.2, 0.1}. ROC points in order:
        // (0,0) (0,1/3) (0,2/3) (1/3,2/3) (1/3,1) (2/3,1) (1,1).
        // FAR - FRR: -1, -2/3, -1/3, 0 -> exact crossing at (1/3, 2/3), threshold 0.45.
        let q = [
            s(0.9, true),
            s(0.8, true),
            s(0.3, true),
            s(0.6, false),
            s(0.2, false),
            s(0.1, false),
        ];
        let e = eer(&roc_curve(&q).unwrap()).unwrap();
        assert!(close(e.eer, 1.0 / 3.0));
        assert!(close(e.threshold, 0.45));
        // Interpolated crossing: P {0.9, 0.5}, N {0.6, 0.1, 0.05, 0.0}.
        // Points: (0,0) (0,.5) (.25,.5) (.25,1) ... ; g = -1, -.5, -.25, +.25:
        // crossing halfway from (.25,.5) to (.25,1) -> EER 0.25, threshold
        // halfway between 0.55 and 0.3 = 0.425.
        let r = [
            s(0.9, true),
            s(0.5, true),
            s(0.6, false),
            s(0.1, false),
            s(0.05, false),
            s(0.0, false),
        ];
        let e = eer(&roc_curve(&r).unwrap()).unwrap();
        assert!(close(e.eer, 0.25), "{e:?}");
        assert!(close(e.threshold, 0.425), "{e:?}");
    }

    #[test]
    fn tar_at_far_hand_case() {
        // 4 mismatched: FAR steps of 0.25. P {0.9, 0.7, 0.5, 0.2}, N {0.8, 0.4, 0.3, 0.1}.
        let p = [
            s(0.9, true),
            s(0.7, true),
            s(0.5, true),
            s(0.2, true),
            s(0.8, false),
            s(0.4, false),
            s(0.3, false),
            s(0.1, false),
        ];
        let roc = roc_curve(&p).unwrap();
        // FAR 0: only 0.9 can be accepted -> TAR 0.25 at threshold 0.85.
        let t = tar_at_far(&roc, 0.1, 4).unwrap();
        assert!(close(t.tar, 0.25) && close(t.far, 0.0) && close(t.threshold, 0.85));
        assert!(t.below_resolution);
        // FAR <= 0.25: accept down to 0.5 -> TAR 0.75 at threshold 0.45.
        let t = tar_at_far(&roc, 0.25, 4).unwrap();
        assert!(close(t.tar, 0.75) && close(t.far, 0.25) && close(t.threshold, 0.45));
        assert!(!t.below_resolution);
    }

    // ---- against brute force on random data ----

    fn brute_accuracy(pairs: &[Scored], t: f64) -> f64 {
        let mut ok = 0;
        for p in pairs {
            let accepted = p.score >= t;
            if accepted == p.same {
                ok += 1;
            }
        }
        ok as f64 / pairs.len() as f64
    }

    /// Every midpoint of every two distinct scores, both outer thresholds;
    /// the lowest of the most accurate.
    fn brute_best(pairs: &[Scored]) -> (f64, f64) {
        let mut scores: Vec<f64> = pairs.iter().map(|p| p.score).collect();
        scores.sort_by(f64::total_cmp);
        scores.dedup();
        let mut cands = vec![scores[0] - 1.0, scores[scores.len() - 1] + 1.0];
        for w in scores.windows(2) {
            cands.push(w[0] / 2.0 + w[1] / 2.0);
        }
        let mut best = (f64::INFINITY, f64::NEG_INFINITY);
        for &t in &cands {
            let a = brute_accuracy(pairs, t);
            if a > best.1 || (a == best.1 && t < best.0) {
                best = (t, a);
            }
        }
        best
    }

    fn brute_auc(pairs: &[Scored]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for a in pairs.iter().filter(|p| p.same) {
            for b in pairs.iter().filter(|p| !p.same) {
                den += 1.0;
                if a.score > b.score {
                    num += 1.0;
                } else if a.score == b.score {
                    num += 0.5;
                }
            }
        }
        num / den
    }

    fn brute_rates(pairs: &[Scored], t: f64) -> (f64, f64) {
        let pos = pairs.iter().filter(|p| p.same).count() as f64;
        let neg = pairs.len() as f64 - pos;
        let fa = pairs.iter().filter(|p| !p.same && p.score >= t).count() as f64;
        let ta = pairs.iter().filter(|p| p.same && p.score >= t).count() as f64;
        (fa / neg, ta / pos)
    }

    fn random_pairs(rng: &mut rand::rngs::StdRng, n: usize, coarse: bool) -> Vec<Scored> {
        (0..n)
            .map(|_| {
                let same = rng.random_bool(0.5);
                let mut score: f64 = rng.random_range(-1.0..1.0) + if same { 0.4 } else { 0.0 };
                if coarse {
                    // Few distinct values: plenty of ties across classes.
                    score = (score * 4.0).round() / 4.0;
                }
                Scored { score, same }
            })
            .collect()
    }

    #[test]
    fn matches_brute_force_on_random_data() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..300 {
            let n = rng.random_range(2..60);
            let pairs = random_pairs(&mut rng, n, round % 3 == 0);
            let (pos, neg) = class_counts(&pairs);

            let (bt, ba) = brute_best(&pairs);
            let b = best_threshold(&pairs).unwrap();
            assert!(
                close(b.threshold, bt) && close(b.accuracy, ba),
                "round {round}"
            );

            let k = rng.random_range(2..5);
            let folds: Vec<usize> = (0..n).map(|i| i % k).collect();
            if n >= k {
                let cv = cross_validate(&pairs, &folds, k).unwrap();
                let mut accs = Vec::new();
                for f in 0..k {
                    let train: Vec<Scored> = (0..n)
                        .filter(|&i| folds[i] != f)
                        .map(|i| pairs[i])
                        .collect();
                    let test: Vec<Scored> = (0..n)
                        .filter(|&i| folds[i] == f)
                        .map(|i| pairs[i])
                        .collect();
                    let (t, _) = brute_best(&train);
                    assert!(close(cv.folds[f].threshold, t), "round {round}");
                    let a = brute_accuracy(&test, t);
                    assert!(close(cv.folds[f].accuracy, a), "round {round}");
                    accs.push(a);
                }
                let mean = accs.iter().sum::<f64>() / k as f64;
                let std = (accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / k as f64).sqrt();
                assert!(close(cv.mean, mean) && close(cv.std, std), "round {round}");
            }

            if pos == 0 || neg == 0 {
                assert!(roc_auc(&pairs).is_err());
                continue;
            }
            assert!(
                close(roc_auc(&pairs).unwrap(), brute_auc(&pairs)),
                "round {round}"
            );

            let roc = roc_curve(&pairs).unwrap();
            for p in &roc {
                let (far, tar) = brute_rates(&pairs, p.threshold);
                assert!(close(p.far, far) && close(p.tar, tar), "round {round}");
            }
            // Every candidate threshold appears once, in descending order.
            let mut cands = candidate_thresholds(&pairs);
            cands.reverse();
            let thr: Vec<f64> = roc.iter().map(|p| p.threshold).collect();
            assert_eq!(thr, cands);

            for target in [0.0, 0.01, 0.1, 0.3] {
                let got = tar_at_far(&roc, target, neg).unwrap();
                let mut best: Option<(f64, f64, f64)> = None;
                for &t in &cands {
                    let (far, tar) = brute_rates(&pairs, t);
                    if far <= target && best.is_none_or(|b| tar > b.1 || (tar == b.1 && far < b.2))
                    {
                        best = Some((t, tar, far));
                    }
                }
                let (t, tar, far) = best.unwrap();
                assert!(
                    close(got.threshold, t) && close(got.tar, tar) && close(got.far, far),
                    "round {round} target {target}"
                );
            }

            // EER: FAR and FRR are equal at the reported point, and it lies
            // between the last ROC point where FAR < FRR and the first where
            // FAR >= FRR (brute-force rates at every candidate).
            let e = eer(&roc).unwrap();
            let rates: Vec<(f64, f64, f64)> = cands
                .iter()
                .map(|&t| {
                    let (far, tar) = brute_rates(&pairs, t);
                    (t, far, 1.0 - tar)
                })
                .collect();
            let first = rates.iter().position(|r| r.1 >= r.2).unwrap();
            let (t1, far1, frr1) = rates[first];
            if far1 == frr1 || first == 0 {
                assert!(
                    close(e.eer, far1) && close(e.threshold, t1),
                    "round {round}"
                );
            } else {
                let (t0, far0, frr0) = rates[first - 1];
                let lo = far0.min(frr1).min(far1).min(frr0);
                let hi = far0.max(frr1).max(far1).max(frr0);
                assert!(e.eer >= lo - 1e-12 && e.eer <= hi + 1e-12, "round {round}");
                assert!(
                    e.threshold <= t0 + 1e-12 && e.threshold >= t1 - 1e-12,
                    "round {round}"
                );
                // On the segment, at the interpolated point, FAR equals FRR.
                let w = (e.threshold - t0) / (t1 - t0);
                let far = far0 + w * (far1 - far0);
                let frr = frr0 + w * (frr1 - frr0);
                assert!(close(far, frr) && close(far, e.eer), "round {round}");
            }
        }
    }

    #[test]
    fn non_finite_scores_are_rejected() {
        let p = [s(0.1, true), s(f64::NAN, false)];
        assert!(matches!(
            best_threshold(&p),
            Err(MetricsError::NonFinite { index: 1, .. })
        ));
        assert_eq!(best_threshold(&[]), Err(MetricsError::Empty));
    }
}
