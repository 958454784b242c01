//! In-memory exact 1:N index over the faces of the running model.
//!
//! Embeddings live in one contiguous row-major matrix so a search is a single
//! linear sweep through memory (the hardware prefetcher's best case); face and
//! subject ids sit in parallel arrays. Deletes swap the last row into the hole,
//! so the matrix never has gaps and never needs compaction.

use std::collections::HashMap;

use uuid::Uuid;

/// Dot product written so the compiler vectorises it without `unsafe`: 16
/// independent accumulators break the add dependency chain and map onto whole
/// SIMD registers (4 x SSE or 2 x AVX lanes of 8), with no bounds checks inside
/// the loop thanks to `chunks_exact`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    // Pairwise reduction keeps the same association order on every call.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// One subject known to the index (present even with no searchable faces, so
/// identify can name it and verify can tell "no faces" from "unknown").
#[derive(Debug, Clone)]
pub struct SubjectSlot {
    pub id: Uuid,
    pub name: String,
    /// Searchable faces of this subject (rows found through `Index::row_of`).
    pub faces: Vec<Uuid>,
}

/// One identify hit: the subject, its best similarity, and the face that gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub subject_id: Uuid,
    pub name: String,
    pub similarity: f32,
    pub face_id: Uuid,
}

#[derive(Debug)]
pub struct Index {
    dim: usize,
    /// Row-major, `face_ids.len() * dim` floats.
    data: Vec<f32>,
    face_ids: Vec<Uuid>,
    /// Slot (into `subjects`) of each row's subject.
    face_subject: Vec<u32>,
    row_of: HashMap<Uuid, u32>,
    /// Slab of subjects: a deleted subject leaves `None` and its slot is reused,
    /// so row -> slot links never need rewriting on subject deletes.
    subjects: Vec<Option<SubjectSlot>>,
    slot_of: HashMap<Uuid, u32>,
    free_slots: Vec<u32>,
    /// Subjects with at least one searchable face, kept so identify can report
    /// the searched gallery size without walking every subject.
    nonempty: usize,
}

impl Index {
    pub fn new(dim: usize) -> Self {
        Self::with_capacity(dim, 0, 0)
    }

    /// Pre-sized so loading a large gallery never reallocates (and briefly
    /// doubles) the matrix.
    pub fn with_capacity(dim: usize, faces: usize, subjects: usize) -> Self {
        Self {
            dim,
            data: Vec::with_capacity(faces * dim),
            face_ids: Vec::with_capacity(faces),
            face_subject: Vec::with_capacity(faces),
            row_of: HashMap::with_capacity(faces),
            subjects: Vec::with_capacity(subjects),
            slot_of: HashMap::with_capacity(subjects),
            free_slots: Vec::new(),
            nonempty: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Searchable faces.
    pub fn faces(&self) -> usize {
        self.face_ids.len()
    }

    /// Subjects known to the index (with or without faces).
    pub fn subjects(&self) -> usize {
        self.slot_of.len()
    }

    /// Subjects that have at least one searchable face: what a 1:N query searches.
    pub fn searchable_subjects(&self) -> usize {
        self.nonempty
    }

    /// Heap bytes held by the index (capacity, not just length), for reports.
    pub fn heap_bytes(&self) -> usize {
        let map_entry = std::mem::size_of::<(Uuid, u32)>() + 1; // hashbrown: one control byte each
        self.data.capacity() * 4
            + self.face_ids.capacity() * 16
            + self.face_subject.capacity() * 4
            + self.row_of.capacity() * map_entry
            + self.slot_of.capacity() * map_entry
            + self.subjects.capacity() * std::mem::size_of::<Option<SubjectSlot>>()
            + self
                .subjects
                .iter()
                .flatten()
                .map(|s| s.name.capacity() + s.faces.capacity() * 16)
                .sum::<usize>()
    }

    pub fn has_subject(&self, id: &Uuid) -> bool {
        self.slot_of.contains_key(id)
    }

    pub fn has_face(&self, id: &Uuid) -> bool {
        self.row_of.contains_key(id)
    }

    /// Every indexed face id, in no particular order.
    pub fn face_ids(&self) -> impl Iterator<Item = &Uuid> + '_ {
        self.row_of.keys()
    }

    /// Current matrix row of a face (rows move on deletes).
    pub fn row_of_face(&self, id: &Uuid) -> Option<usize> {
        self.row_of.get(id).map(|&r| r as usize)
    }

    /// Adds a subject (idempotent: an existing subject keeps its faces).
    pub fn add_subject(&mut self, id: Uuid, name: String) {
        if self.slot_of.contains_key(&id) {
            return;
        }
        let slot = SubjectSlot {
            id,
            name,
            faces: Vec::new(),
        };
        let idx = match self.free_slots.pop() {
            Some(i) => {
                self.subjects[i as usize] = Some(slot);
                i
            }
            None => {
                self.subjects.push(Some(slot));
                (self.subjects.len() - 1) as u32
            }
        };
        self.slot_of.insert(id, idx);
    }

    /// Removes a subject and all its faces; returns how many faces went.
    pub fn remove_subject(&mut self, id: &Uuid) -> usize {
        let Some(slot) = self.slot_of.remove(id) else {
            return 0;
        };
        let faces = self.subjects[slot as usize]
            .take()
            .map(|s| s.faces)
            .unwrap_or_default();
        if !faces.is_empty() {
            self.nonempty -= 1;
        }
        for f in &faces {
            self.remove_row(f);
        }
        self.free_slots.push(slot);
        faces.len()
    }

    /// Adds a face row. The caller guarantees `embedding.len() == dim`; a face
    /// of an unknown subject, or a duplicate face id, is refused with `false`.
    pub fn add_face(&mut self, face_id: Uuid, subject_id: &Uuid, embedding: &[f32]) -> bool {
        if embedding.len() != self.dim || self.row_of.contains_key(&face_id) {
            return false;
        }
        let Some(&slot) = self.slot_of.get(subject_id) else {
            return false;
        };
        let row = self.face_ids.len() as u32;
        self.data.extend_from_slice(embedding);
        self.face_ids.push(face_id);
        self.face_subject.push(slot);
        self.row_of.insert(face_id, row);
        if let Some(s) = self.subjects[slot as usize].as_mut() {
            if s.faces.is_empty() {
                self.nonempty += 1;
            }
            s.faces.push(face_id);
        }
        true
    }

    /// Removes one face; returns whether it was there.
    pub fn remove_face(&mut self, face_id: &Uuid) -> bool {
        let Some(&row) = self.row_of.get(face_id) else {
            return false;
        };
        let slot = self.face_subject[row as usize];
        if let Some(s) = self.subjects[slot as usize].as_mut() {
            s.faces.retain(|f| f != face_id);
            if s.faces.is_empty() {
                self.nonempty -= 1;
            }
        }
        self.remove_row(face_id)
    }

    /// Swap-remove: the last row moves into the hole, and its map entry follows.
    fn remove_row(&mut self, face_id: &Uuid) -> bool {
        let Some(row) = self.row_of.remove(face_id) else {
            return false;
        };
        let row = row as usize;
        let last = self.face_ids.len() - 1;
        if row != last {
            let (d, dim) = (&mut self.data, self.dim);
            d.copy_within(last * dim..(last + 1) * dim, row * dim);
            self.face_ids[row] = self.face_ids[last];
            self.face_subject[row] = self.face_subject[last];
            self.row_of.insert(self.face_ids[row], row as u32);
        }
        self.data.truncate(last * self.dim);
        self.face_ids.truncate(last);
        self.face_subject.truncate(last);
        true
    }

    pub fn subject(&self, id: &Uuid) -> Option<&SubjectSlot> {
        self.slot_of
            .get(id)
            .and_then(|&s| self.subjects[s as usize].as_ref())
    }

    fn row(&self, row: usize) -> &[f32] {
        &self.data[row * self.dim..(row + 1) * self.dim]
    }

    /// Best similarity of `query` over a subject's searchable faces, with the
    /// face that gave it; `None` when the subject has no searchable face.
    pub fn best_for_subject(&self, subject: &SubjectSlot, query: &[f32]) -> Option<(f32, Uuid)> {
        let mut best: Option<(f32, Uuid)> = None;
        for f in &subject.faces {
            if let Some(&row) = self.row_of.get(f) {
                let s = dot(self.row(row as usize), query);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, *f));
                }
            }
        }
        best
    }

    /// Exact 1:N search: every face is compared; a subject scores its best face;
    /// the `top_k` best subjects at or above `threshold` come back, best first
    /// (ties broken by subject id so the order is deterministic).
    pub fn search(&self, query: &[f32], top_k: usize, threshold: f32) -> Vec<Hit> {
        if top_k == 0 || query.len() != self.dim || self.face_ids.is_empty() {
            return Vec::new();
        }
        let mut best = vec![f32::NEG_INFINITY; self.subjects.len()];
        let mut best_row = vec![u32::MAX; self.subjects.len()];
        for (row, (v, &slot)) in self
            .data
            .chunks_exact(self.dim)
            .zip(&self.face_subject)
            .enumerate()
        {
            let s = dot(v, query);
            let b = &mut best[slot as usize];
            if s > *b {
                *b = s;
                best_row[slot as usize] = row as u32;
            }
        }
        let mut cands: Vec<(f32, u32)> = best
            .iter()
            .enumerate()
            .filter(|&(i, &s)| best_row[i] != u32::MAX && s >= threshold)
            .map(|(i, &s)| (s, i as u32))
            .collect();
        let id_of = |slot: u32| {
            self.subjects[slot as usize]
                .as_ref()
                .map(|s| s.id)
                .unwrap_or_default()
        };
        let order = |a: &(f32, u32), b: &(f32, u32)| {
            b.0.total_cmp(&a.0)
                .then_with(|| id_of(a.1).cmp(&id_of(b.1)))
        };
        if cands.len() > top_k {
            cands.select_nth_unstable_by(top_k - 1, order);
            cands.truncate(top_k);
        }
        cands.sort_unstable_by(order);
        cands
            .into_iter()
            .filter_map(|(s, slot)| {
                let subj = self.subjects[slot as usize].as_ref()?;
                Some(Hit {
                    subject_id: subj.id,
                    name: subj.name.clone(),
                    similarity: s,
                    face_id: self.face_ids[best_row[slot as usize] as usize],
                })
            })
            .collect()
    }

    /// Checks every internal link; used by tests after mixed updates.
    #[cfg(test)]
    pub fn check_consistent(&self) {
        assert_eq!(self.data.len(), self.face_ids.len() * self.dim);
        assert_eq!(self.face_ids.len(), self.face_subject.len());
        assert_eq!(self.row_of.len(), self.face_ids.len());
        for (row, id) in self.face_ids.iter().enumerate() {
            assert_eq!(self.row_of[id] as usize, row);
            let slot = self.subjects[self.face_subject[row] as usize]
                .as_ref()
                .expect("row points at a live subject");
            assert!(slot.faces.contains(id));
        }
        let nonempty = self
            .subjects
            .iter()
            .flatten()
            .filter(|s| !s.faces.is_empty())
            .count();
        assert_eq!(nonempty, self.nonempty);
        let listed: usize = self.subjects.iter().flatten().map(|s| s.faces.len()).sum();
        assert_eq!(listed, self.face_ids.len());
        for (id, &slot) in &self.slot_of {
            assert_eq!(
                self.subjects[slot as usize].as_ref().map(|s| s.id),
                Some(*id)
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const DIM: usize = 512;

    pub(crate) fn unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
        // Sum of uniforms is close enough to Gaussian for direction sampling here.
        let mut v: Vec<f32> = (0..dim)
            .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum())
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    /// The straightforward loop the index must agree with: f64 sums, every
    /// face, best per subject, full sort.
    pub(crate) fn naive(
        faces: &[(Uuid, Uuid, Vec<f32>)],
        live: impl Fn(&Uuid) -> bool,
        q: &[f32],
        k: usize,
        thr: f32,
    ) -> Vec<(Uuid, f64, Uuid)> {
        let mut best: HashMap<Uuid, (f64, Uuid)> = HashMap::new();
        for (fid, sid, v) in faces {
            let s: f64 = v
                .iter()
                .zip(q)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let e = best.entry(*sid).or_insert((f64::NEG_INFINITY, *fid));
            if s > e.0 {
                *e = (s, *fid);
            }
        }
        let mut all: Vec<(Uuid, f64, Uuid)> = best
            .into_iter()
            .filter(|(sid, (s, _))| live(sid) && *s >= f64::from(thr))
            .map(|(sid, (s, f))| (sid, s, f))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    /// Same subjects in the same order with the same best face and similarity
    /// (to float rounding: the index sums in f32, the loop in f64). Random
    /// 512-d vectors make near-ties at the 1e-5 level vanishingly rare; if one
    /// ever occurs the assertion names it.
    fn assert_same(got: &[Hit], want: &[(Uuid, f64, Uuid)]) {
        assert_eq!(
            got.len(),
            want.len(),
            "result length: got {got:?} want {want:?}"
        );
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                g.subject_id, w.0,
                "subject order: got {got:?} want {want:?}"
            );
            assert_eq!(g.face_id, w.2, "best face of {}", w.0);
            assert!(
                (f64::from(g.similarity) - w.1).abs() < 1e-5,
                "similarity {} vs {}",
                g.similarity,
                w.1
            );
        }
    }

    #[test]
    fn dot_matches_plain_sum_for_odd_lengths() {
        let mut rng = StdRng::seed_from_u64(1);
        for len in [0, 1, 7, 16, 17, 100, 512, 515] {
            let a: Vec<f32> = (0..len).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.random::<f32>() - 0.5).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-5, "len {len}");
        }
    }

    type Built = (Index, Vec<(Uuid, Uuid, Vec<f32>)>, HashMap<Uuid, String>);

    fn build(rng: &mut StdRng, subjects: usize, faces: usize) -> Built {
        let mut idx = Index::new(DIM);
        let mut names = HashMap::new();
        let sids: Vec<Uuid> = (0..subjects).map(|_| Uuid::new_v4()).collect();
        for (i, s) in sids.iter().enumerate() {
            idx.add_subject(*s, format!("s{i}"));
            names.insert(*s, format!("s{i}"));
        }
        let mut all = Vec::new();
        for _ in 0..faces {
            let sid = sids[rng.random_range(0..subjects)];
            let v = unit(rng, DIM);
            let fid = Uuid::new_v4();
            assert!(idx.add_face(fid, &sid, &v));
            all.push((fid, sid, v));
        }
        (idx, all, names)
    }

    #[test]
    fn search_equals_naive_scan() {
        let mut rng = StdRng::seed_from_u64(7);
        let (idx, faces, names) = build(&mut rng, 600, 3000);
        idx.check_consistent();
        for q in 0..40 {
            // Half the queries are near-duplicates of stored faces, so top hits
            // are clear; the rest are random, so the top-k is a close race.
            let query = if q % 2 == 0 {
                let base = &faces[rng.random_range(0..faces.len())].2;
                let noise = unit(&mut rng, DIM);
                let mut v: Vec<f32> = base.iter().zip(&noise).map(|(a, b)| a + 0.3 * b).collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= n);
                v
            } else {
                unit(&mut rng, DIM)
            };
            for (k, thr) in [(1, -1.0), (5, -1.0), (10, 0.05), (50, -1.0), (5000, -1.0)] {
                assert_same(
                    &idx.search(&query, k, thr),
                    &naive(&faces, |s| names.contains_key(s), &query, k, thr),
                );
            }
        }
    }

    #[test]
    fn deletes_keep_index_consistent_and_exact() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut idx, mut faces, mut names) = build(&mut rng, 200, 2000);
        for round in 0..300 {
            match round % 3 {
                0 => {
                    let i = rng.random_range(0..faces.len());
                    let (fid, _, _) = faces.swap_remove(i);
                    assert!(idx.remove_face(&fid));
                    assert!(!idx.remove_face(&fid), "second delete finds nothing");
                }
                1 if round % 30 == 1 => {
                    let sid = *names.keys().next().expect("subjects left");
                    names.remove(&sid);
                    let before = faces.len();
                    faces.retain(|f| f.1 != sid);
                    assert_eq!(idx.remove_subject(&sid), before - faces.len());
                    // A new subject reuses the freed slot; it must start empty.
                    let new = Uuid::new_v4();
                    idx.add_subject(new, "new".into());
                    names.insert(new, "new".into());
                    assert_eq!(idx.subject(&new).map(|s| s.faces.len()), Some(0));
                }
                _ => {
                    let sid = *names
                        .keys()
                        .nth(rng.random_range(0..names.len()))
                        .expect("subject");
                    let v = unit(&mut rng, DIM);
                    let fid = Uuid::new_v4();
                    assert!(idx.add_face(fid, &sid, &v));
                    faces.push((fid, sid, v));
                }
            }
        }
        idx.check_consistent();
        assert_eq!(idx.faces(), faces.len());
        assert_eq!(idx.subjects(), names.len());
        for _ in 0..10 {
            let q = unit(&mut rng, DIM);
            assert_same(
                &idx.search(&q, 20, -1.0),
                &naive(&faces, |s| names.contains_key(s), &q, 20, -1.0),
            );
        }
        // Deleted faces are never returned, even for a query equal to them.
        let gone = Uuid::new_v4();
        let sid = *names.keys().next().expect("subject");
        let v = unit(&mut rng, DIM);
        assert!(idx.add_face(gone, &sid, &v));
        assert_eq!(idx.search(&v, 1, -1.0)[0].face_id, gone);
        assert!(idx.remove_face(&gone));
        assert!(idx.search(&v, 1000, -1.0).iter().all(|h| h.face_id != gone));
    }

    #[test]
    fn refuses_unknown_subject_duplicate_face_and_wrong_dim() {
        let mut idx = Index::new(4);
        let s = Uuid::new_v4();
        let f = Uuid::new_v4();
        assert!(
            !idx.add_face(f, &s, &[1.0, 0.0, 0.0, 0.0]),
            "unknown subject"
        );
        idx.add_subject(s, "a".into());
        assert!(!idx.add_face(f, &s, &[1.0, 0.0]), "wrong dim");
        assert!(idx.add_face(f, &s, &[1.0, 0.0, 0.0, 0.0]));
        assert!(!idx.add_face(f, &s, &[0.0, 1.0, 0.0, 0.0]), "duplicate id");
        assert_eq!(idx.faces(), 1);
        assert!(
            idx.search(&[1.0, 0.0, 0.0, 0.0], 0, -1.0).is_empty(),
            "top_k 0"
        );
        assert!(
            idx.search(&[1.0, 0.0, 0.0, 0.0], 1, 1.5).is_empty(),
            "above threshold"
        );
        let slot = idx.subject(&s).expect("subject").clone();
        assert_eq!(
            idx.best_for_subject(&slot, &[0.6, 0.8, 0.0, 0.0]),
            Some((0.6, f))
        );
    }
}
