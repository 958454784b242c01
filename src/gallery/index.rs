//! In-memory exact 1:N index over the faces of the running model.
//!
//! A query reads every face, so the scan's cost is the bytes it streams. Each
//! face is scanned as 8-bit codes with a per-face scale (a quarter of its f32
//! bytes), on all cores, and the short list the codes cannot rule out is
//! re-scored exactly from the face's f32 vector. The rounding error of a code
//! is bounded, so "cannot rule out" is a proof, not a guess: the answer is the
//! one an f32 scan of every face gives, similarities included.
//!
//! The f32 vectors live in a spill file (the OS page cache keeps it in memory
//! while memory is free, and drops it under pressure), not on the heap: only
//! the short list and 1:1 comparisons read it.
//!
//! Rows sit in fixed-size segments behind `Arc`s. A search takes a snapshot
//! (a copy of the segment list, not of the rows) under the caller's read lock
//! and scans after releasing it; a write that touches a segment a snapshot
//! still holds copies that one segment first. Deletes swap the last row into
//! the hole, so the rows never have gaps.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use uuid::Uuid;

/// Rows per segment: a write under a concurrent search copies at most one
/// segment (2 MiB of codes at 512-d), and a snapshot copies 245 pointers at 1M faces.
const SEGMENT_ROWS: usize = 4096;
/// A thread scans at least this many rows: below it, starting threads costs
/// more than the scan.
const ROWS_PER_THREAD: usize = 128 * 1024;
/// f32 rows buffered before one write to the spill file (0.5 MiB at 512-d):
/// loading a large gallery makes one system call per 256 faces, not per face.
const TAIL_ROWS: usize = 256;
/// Faces per `FaceBatch` in a start-up load (2 MiB of vectors at 512-d).
pub const BATCH_ROWS: usize = 1024;

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

/// Integer dot product of 8-bit codes and a 16-bit query: exact, no rounding.
/// At 512-d each i32 lane sums 64 products of at most 127 * 32767, far from overflow.
#[inline(always)]
fn dot_codes(codes: &[i8], q: &[i16]) -> i32 {
    const LANES: usize = 16;
    let mut acc = [0i32; LANES];
    let cc = codes.chunks_exact(LANES);
    let cq = q.chunks_exact(LANES);
    let tail: i32 = cc
        .remainder()
        .iter()
        .zip(cq.remainder())
        .map(|(c, y)| i32::from(*c) * i32::from(*y))
        .sum();
    for (c, y) in cc.zip(cq) {
        for i in 0..LANES {
            acc[i] += i32::from(c[i]) * i32::from(y[i]);
        }
    }
    acc.iter().sum::<i32>() + tail
}

/// `dot_codes` with AVX2: sign-extend 16 codes to i16 and multiply-add pairs
/// into i32 lanes (`vpmaddwd`), 32 values per iteration.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_codes_avx2(codes: &[i8], q: &[i16]) -> i32 {
    use std::arch::x86_64::*;
    let n = codes.len().min(q.len());
    let body = n / 32 * 32;
    let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 32 <= n, so every load reads inside both slices.
        unsafe {
            let c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(codes.as_ptr().add(i).cast()));
            let c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(codes.as_ptr().add(i + 16).cast()));
            let q0 = _mm256_loadu_si256(q.as_ptr().add(i).cast());
            let q1 = _mm256_loadu_si256(q.as_ptr().add(i + 16).cast());
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(c0, q0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(c1, q1));
        }
        i += 32;
    }
    let a = _mm256_add_epi32(a0, a1);
    let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) + dot_codes(&codes[body..n], &q[body..n])
}

/// `dot_codes` with AVX-512 VNNI: 32 codes sign-extended per register and
/// multiply-accumulated in one instruction (`vpdpwssd`), 64 values per iteration.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bw,avx512vnni")]
fn dot_codes_vnni(codes: &[i8], q: &[i16]) -> i32 {
    use std::arch::x86_64::*;
    let n = codes.len().min(q.len());
    let body = n / 64 * 64;
    let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 64 <= n, so every load reads inside both slices.
        unsafe {
            let c0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(codes.as_ptr().add(i).cast()));
            let c1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(codes.as_ptr().add(i + 32).cast()));
            a0 = _mm512_dpwssd_epi32(a0, c0, _mm512_loadu_si512(q.as_ptr().add(i).cast()));
            a1 = _mm512_dpwssd_epi32(a1, c1, _mm512_loadu_si512(q.as_ptr().add(i + 32).cast()));
        }
        i += 64;
    }
    _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) + dot_codes(&codes[body..n], &q[body..n])
}

/// Code scores of one segment's rows into `out`: `scale * q_scale * codes . q`.
fn scan_segment(seg: &Segment, dim: usize, q: &QueryCodes, out: &mut [f32]) {
    let rows = out
        .iter_mut()
        .zip(seg.codes.chunks_exact(dim))
        .zip(&seg.scales);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
    {
        for ((o, codes), s) in rows {
            // SAFETY: the CPU has just been seen to support both extensions.
            *o = s * q.scale * unsafe { dot_codes_vnni(codes, &q.codes) } as f32;
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        for ((o, codes), s) in rows {
            // SAFETY: the CPU has just been seen to support AVX2.
            *o = s * q.scale * unsafe { dot_codes_avx2(codes, &q.codes) } as f32;
        }
        return;
    }
    for ((o, codes), s) in rows {
        *o = s * q.scale * dot_codes(codes, &q.codes) as f32;
    }
}

/// The query as 16-bit integers: `q[i] ~= scale * codes[i]`, off by at most
/// `scale / 2` (about 1.5e-5 of the largest value).
struct QueryCodes {
    codes: Vec<i16>,
    scale: f32,
}

impl QueryCodes {
    fn new(q: &[f32]) -> Self {
        let max = q.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = max / 32767.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        Self {
            codes: q
                .iter()
                .map(|x| (x * inv).round().clamp(-32767.0, 32767.0) as i16)
                .collect(),
            scale,
        }
    }
}

/// 8-bit codes of `v` and their scale: `v[i] ~= scale * codes[i]`, each off by
/// at most `scale / 2` (plus f32 rounding, covered by `Snapshot::error_bound`).
///
/// Written so it vectorises on baseline x86-64 (SSE2): the largest magnitude
/// is a max over the sign-cleared bit patterns (ordered like the values for
/// non-negative floats), and rounding adds 1.5 * 2^23, after which the
/// integer sits in the low mantissa bits (round half to even), so the code is
/// the low byte of the sum. `f32::round` is a libm call per value and a
/// saturating `as i8` a scalar branch per value; with them this was most of
/// the start-up time at 1M faces. A vector holding a NaN (never stored by
/// the gallery) gets a NaN scale, so it never makes a short list.
fn quantise(v: &[f32], codes: &mut Vec<i8>) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let max = v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
    let scale = f32::from_bits(max) / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    codes.extend(
        v.iter()
            .map(|x| ((x * inv).clamp(-127.0, 127.0) + ROUND).to_bits() as i8),
    );
    scale
}

/// One run of consecutive rows. Parallel arrays, one entry per row.
#[derive(Debug, Default)]
struct Segment {
    /// Row-major, `dim` codes per row.
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// Slot (into `Index::subjects`) of each row's subject.
    slots: Vec<u32>,
    /// Where each row's f32 vector is in the spill file.
    spill: Vec<u32>,
    face_ids: Vec<Uuid>,
}

impl Segment {
    fn with_rows(rows: usize, dim: usize) -> Self {
        Self {
            codes: Vec::with_capacity(rows * dim),
            scales: Vec::with_capacity(rows),
            slots: Vec::with_capacity(rows),
            spill: Vec::with_capacity(rows),
            face_ids: Vec::with_capacity(rows),
        }
    }
    #[cfg(test)]
    fn len(&self) -> usize {
        self.face_ids.len()
    }
    fn heap_bytes(&self) -> usize {
        self.codes.capacity()
            + (self.scales.capacity() + self.slots.capacity() + self.spill.capacity()) * 4
            + self.face_ids.capacity() * 16
    }
}

// Copy-on-write keeps the capacity, so a copied segment still fills to
// SEGMENT_ROWS without a reallocation (a derived clone would trim it).
impl Clone for Segment {
    fn clone(&self) -> Self {
        fn keep<T: Clone>(v: &[T], cap: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(cap);
            out.extend_from_slice(v);
            out
        }
        Self {
            codes: keep(&self.codes, self.codes.capacity()),
            scales: keep(&self.scales, self.scales.capacity()),
            slots: keep(&self.slots, self.slots.capacity()),
            spill: keep(&self.spill, self.spill.capacity()),
            face_ids: keep(&self.face_ids, self.face_ids.capacity()),
        }
    }
}

/// The f32 vectors, by spill slot, in an unlinked temporary file: nothing is
/// left behind by a crash, and the gallery database stays the durable copy.
#[derive(Debug)]
struct SpillFile {
    file: File,
    dim: usize,
}

impl SpillFile {
    fn create(dim: usize) -> std::io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir: PathBuf = std::env::temp_dir();
        loop {
            let path = dir.join(format!(
                "mobiface-index-{}-{}.f32",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    std::fs::remove_file(&path)?;
                    return Ok(Self { file, dim });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn offset(&self, slot: u32) -> u64 {
        u64::from(slot) * (self.dim * 4) as u64
    }

    fn write(&self, slot: u32, rows: &[f32]) -> std::io::Result<()> {
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write_bytes(slot, &bytes)
    }

    /// Rows already in the file's layout (little-endian f32), from `slot` on.
    fn write_bytes(&self, slot: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.offset(slot))
    }

    fn read(&self, slot: u32, out: &mut [f32]) -> std::io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 4];
        self.file.read_exact_at(&mut bytes, self.offset(slot))?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

/// f32 rows of the newest spill slots, not yet written to the file.
#[derive(Debug, Clone)]
struct Tail {
    start: u32,
    data: Vec<f32>,
}

/// Where exact vectors are read from: the spill file and the unwritten tail.
/// Shared with snapshots; a slot is only rewritten once no snapshot can name it.
#[derive(Debug, Clone)]
struct Vectors {
    file: Arc<SpillFile>,
    tail: Arc<Tail>,
}

impl Vectors {
    fn read(&self, slot: u32, out: &mut [f32]) -> bool {
        let dim = self.file.dim;
        let t = &self.tail;
        if slot >= t.start {
            let at = (slot - t.start) as usize * dim;
            match t.data.get(at..at + dim) {
                Some(v) => {
                    out.copy_from_slice(v);
                    return true;
                }
                None => return false,
            }
        }
        match self.file.read(slot, out) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(slot, error = %e, "cannot read a face vector from the index spill file");
                false
            }
        }
    }

    fn exact(&self, slot: u32, q: &[f32], buf: &mut [f32]) -> Option<f32> {
        self.read(slot, buf).then(|| dot(buf, q))
    }
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

/// A subject's exact best score among the short list of a snapshot search;
/// `Index::resolve` names it and cuts the list to `top_k`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub similarity: f32,
    pub face_id: Uuid,
}

/// Faces as storage hands them over: ids and each vector's little-endian f32
/// bytes back to back (the layout of the SQLite and PostgreSQL blobs and of
/// the spill file), for `Index::add_batch`. Cleared and refilled, so a load
/// allocates it once.
#[derive(Debug, Default)]
pub struct FaceBatch {
    face_ids: Vec<Uuid>,
    subject_ids: Vec<Uuid>,
    vectors: Vec<u8>,
    row_bytes: usize,
}

impl FaceBatch {
    pub fn with_capacity(rows: usize, dim: usize) -> Self {
        Self {
            face_ids: Vec::with_capacity(rows),
            subject_ids: Vec::with_capacity(rows),
            vectors: Vec::with_capacity(rows * dim * 4),
            row_bytes: dim * 4,
        }
    }

    /// `false` (nothing added) when `vector` is not `dim` little-endian f32s.
    pub fn push(&mut self, face_id: Uuid, subject_id: Uuid, vector: &[u8]) -> bool {
        if vector.len() != self.row_bytes {
            return false;
        }
        self.face_ids.push(face_id);
        self.subject_ids.push(subject_id);
        self.vectors.extend_from_slice(vector);
        true
    }

    pub fn len(&self) -> usize {
        self.face_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.face_ids.is_empty()
    }

    pub fn clear(&mut self) {
        self.face_ids.clear();
        self.subject_ids.clear();
        self.vectors.clear();
    }

    fn row<'a>(&self, i: usize, buf: &'a mut [f32]) -> (Uuid, Uuid, &'a [f32]) {
        let bytes = &self.vectors[i * self.row_bytes..(i + 1) * self.row_bytes];
        for (o, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        (self.face_ids[i], self.subject_ids[i], buf)
    }
}

/// The write half of `Index::add_batch`, usable from another thread.
#[derive(Debug, Clone)]
pub struct SpillWriter(Arc<SpillFile>);

impl SpillWriter {
    /// Writes the vectors `add_batch` left in `batch`, from slot `at` on.
    pub fn write(&self, at: u32, batch: &FaceBatch) -> std::io::Result<()> {
        if batch.vectors.is_empty() {
            return Ok(());
        }
        self.0.write_bytes(at, &batch.vectors)
    }
}

#[derive(Debug)]
pub struct Index {
    dim: usize,
    segments: Vec<Arc<Segment>>,
    rows: usize,
    row_of: HashMap<Uuid, u32>,
    /// Wrapping sum of the indexed face ids (`Gallery::faces_digest`), kept as
    /// rows come and go: `/readyz` reads it on every probe, and summing a
    /// million ids there would cost each probe milliseconds under the lock.
    id_sum: u128,
    /// Slab of subjects: a deleted subject leaves `None` and its slot is reused,
    /// so row -> slot links never need rewriting on subject deletes.
    subjects: Vec<Option<SubjectSlot>>,
    slot_of: HashMap<Uuid, u32>,
    free_slots: Vec<u32>,
    /// Subjects with at least one searchable face, kept so identify can report
    /// the searched gallery size without walking every subject.
    nonempty: usize,
    vectors: Vectors,
    /// Spill slots ever handed out (the file's length in rows).
    spill_slots: u32,
    /// Spill slots free to reuse now.
    free_spill: Vec<u32>,
    /// Freed spill slots that a live snapshot may still read, oldest first,
    /// each batch with the token of the snapshots that may hold it: a batch is
    /// reusable once it and every older batch have no snapshot left.
    retired: VecDeque<(Arc<()>, Vec<u32>)>,
    /// Token cloned into every snapshot taken since the last delete.
    epoch: Arc<()>,
    /// Largest code scale ever stored: the error bound uses it (a stale larger
    /// value after deletes only lengthens the short list).
    max_scale: f32,
}

/// A point-in-time view of the rows, scanned without any lock.
#[derive(Debug)]
pub struct Snapshot {
    dim: usize,
    segments: Vec<Arc<Segment>>,
    rows: usize,
    slots: usize,
    searchable: usize,
    vectors: Vectors,
    max_scale: f32,
    _epoch: Arc<()>,
}

impl Index {
    /// An empty index, for tests: panics if no temporary file can be created
    /// for the spill file. The service uses `try_with_capacity`.
    pub fn new(dim: usize) -> Self {
        Self::try_with_capacity(dim, 0, 0).expect("index spill file in the temporary folder")
    }

    /// Pre-sized so loading a large gallery never reallocates the maps. The
    /// spill file goes in the temporary folder (`TMPDIR`).
    pub fn try_with_capacity(dim: usize, faces: usize, subjects: usize) -> std::io::Result<Self> {
        Ok(Self {
            dim,
            segments: Vec::with_capacity(faces.div_ceil(SEGMENT_ROWS)),
            rows: 0,
            row_of: HashMap::with_capacity(faces),
            id_sum: 0,
            subjects: Vec::with_capacity(subjects),
            slot_of: HashMap::with_capacity(subjects),
            free_slots: Vec::new(),
            nonempty: 0,
            vectors: Vectors {
                file: Arc::new(SpillFile::create(dim)?),
                tail: Arc::new(Tail {
                    start: 0,
                    data: Vec::with_capacity(TAIL_ROWS * dim),
                }),
            },
            spill_slots: 0,
            free_spill: Vec::new(),
            retired: VecDeque::new(),
            epoch: Arc::new(()),
            max_scale: 0.0,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Searchable faces.
    pub fn faces(&self) -> usize {
        self.rows
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
    /// The f32 vectors are not on the heap: see `spill_bytes`.
    pub fn heap_bytes(&self) -> usize {
        let map_entry = std::mem::size_of::<(Uuid, u32)>() + 1; // hashbrown: one control byte each
        self.segments.iter().map(|s| s.heap_bytes()).sum::<usize>()
            + self.segments.capacity() * 8
            + self.vectors.tail.data.capacity() * 4
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

    /// Bytes of f32 vectors in the spill file (page cache, then disk).
    pub fn spill_bytes(&self) -> u64 {
        u64::from(self.spill_slots) * (self.dim * 4) as u64
    }

    pub fn has_subject(&self, id: &Uuid) -> bool {
        self.slot_of.contains_key(id)
    }

    pub fn has_face(&self, id: &Uuid) -> bool {
        self.row_of.contains_key(id)
    }

    /// `super::faces_digest` of the indexed face ids.
    pub fn faces_digest(&self) -> u128 {
        self.id_sum
    }

    /// Current row of a face (rows move on deletes).
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
    /// of an unknown subject, or a duplicate face id, is refused with `false`,
    /// and so is one whose vector cannot be written to the spill file.
    pub fn add_face(&mut self, face_id: Uuid, subject_id: &Uuid, embedding: &[f32]) -> bool {
        if embedding.len() != self.dim || self.row_of.contains_key(&face_id) {
            return false;
        }
        let Some(&slot) = self.slot_of.get(subject_id) else {
            return false;
        };
        let Some(spill) = self.store_vector(embedding) else {
            return false;
        };
        self.row_of.insert(face_id, self.rows as u32);
        self.push_row(face_id, slot, spill, embedding);
        true
    }

    /// Appends a row whose vector is already in spill slot `spill` and whose
    /// face id already maps to the new row.
    fn push_row(&mut self, face_id: Uuid, slot: u32, spill: u32, embedding: &[f32]) {
        let row = self.rows;
        if row / SEGMENT_ROWS == self.segments.len() {
            // The first segment grows as needed (small galleries stay small);
            // later ones are allocated whole.
            let rows = if row == 0 { 0 } else { SEGMENT_ROWS };
            self.segments
                .push(Arc::new(Segment::with_rows(rows, self.dim)));
        }
        let seg = Arc::make_mut(&mut self.segments[row / SEGMENT_ROWS]);
        let scale = quantise(embedding, &mut seg.codes);
        seg.scales.push(scale);
        seg.slots.push(slot);
        seg.spill.push(spill);
        seg.face_ids.push(face_id);
        self.max_scale = self.max_scale.max(scale);
        self.rows += 1;
        self.id_sum = self.id_sum.wrapping_add(face_id.as_u128());
        if let Some(s) = self.subjects[slot as usize].as_mut() {
            if s.faces.is_empty() {
                self.nonempty += 1;
            }
            s.faces.push(face_id);
        }
    }

    /// Adds a batch of faces as `add_face` would one by one (same rows, same
    /// spill slots, same refusals), and hands the writing of their vectors
    /// to the caller: the batch keeps only the rows whose vectors must go to
    /// the spill file, from the returned slot on, in one `SpillWriter::write`
    /// (possibly on another thread, overlapping the next batch). Until that
    /// write is done, the index must not be searched: start-up loads build it
    /// privately. Returns the slot and how many faces were refused.
    pub fn add_batch(&mut self, batch: &mut FaceBatch) -> (u32, usize) {
        let (dim, n) = (self.dim, batch.len());
        if batch.row_bytes != dim * 4 {
            batch.clear();
            return (self.spill_slots, n);
        }
        let mut buf = vec![0f32; dim];
        self.reclaim_spill();
        if !self.free_spill.is_empty() || !self.vectors.tail.data.is_empty() {
            // Slots to reuse or unwritten rows: the batch is not one run at
            // the end of the file, so take the one-by-one path, which writes.
            let mut refused = 0;
            for i in 0..n {
                let (f, s, v) = batch.row(i, &mut buf);
                refused += usize::from(!self.add_face(f, &s, v));
            }
            batch.clear();
            return (self.spill_slots, refused);
        }
        // Refusals (a duplicate inside the batch included) are decided first,
        // and the refused rows dropped from the batch, so that its vectors are
        // exactly the run of new slots.
        let (rb, mut kept, mut row) = (batch.row_bytes, 0, self.rows as u32);
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            let f = batch.face_ids[i];
            let slot = match (
                self.slot_of.get(&batch.subject_ids[i]),
                self.row_of.entry(f),
            ) {
                (Some(&slot), Entry::Vacant(e)) => {
                    e.insert(row);
                    row += 1;
                    slot
                }
                _ => continue,
            };
            if kept != i {
                batch.face_ids[kept] = f;
                batch.subject_ids[kept] = batch.subject_ids[i];
                batch.vectors.copy_within(i * rb..(i + 1) * rb, kept * rb);
            }
            slots.push(slot);
            kept += 1;
        }
        batch.face_ids.truncate(kept);
        batch.subject_ids.truncate(kept);
        batch.vectors.truncate(kept * rb);
        let start = self.spill_slots;
        for (i, slot) in slots.into_iter().enumerate() {
            let (f, _, v) = batch.row(i, &mut buf);
            self.push_row(f, slot, start + i as u32, v);
        }
        self.spill_slots = start + kept as u32;
        Arc::make_mut(&mut self.vectors.tail).start = self.spill_slots;
        (start, n - kept)
    }

    /// `add_batch` and its spill write in one call. Returns how many faces
    /// were refused; on an error the index must be dropped (some of its rows
    /// have no vector).
    pub fn add_batch_written(&mut self, batch: &mut FaceBatch) -> std::io::Result<usize> {
        let (at, refused) = self.add_batch(batch);
        self.spill_writer().write(at, batch)?;
        Ok(refused)
    }

    /// Writes `add_batch`'s vectors; shareable with another thread.
    pub fn spill_writer(&self) -> SpillWriter {
        SpillWriter(self.vectors.file.clone())
    }

    /// Removes one face; returns whether it was there.
    pub fn remove_face(&mut self, face_id: &Uuid) -> bool {
        let Some(&row) = self.row_of.get(face_id) else {
            return false;
        };
        let slot = self.at(row as usize).0.slots[row as usize % SEGMENT_ROWS];
        if let Some(s) = self.subjects[slot as usize].as_mut() {
            s.faces.retain(|f| f != face_id);
            if s.faces.is_empty() {
                self.nonempty -= 1;
            }
        }
        self.remove_row(face_id)
    }

    fn at(&self, row: usize) -> (&Segment, usize) {
        (&self.segments[row / SEGMENT_ROWS], row % SEGMENT_ROWS)
    }

    /// Swap-remove: the last row moves into the hole, and its map entry follows.
    fn remove_row(&mut self, face_id: &Uuid) -> bool {
        let Some(row) = self.row_of.remove(face_id) else {
            return false;
        };
        self.id_sum = self.id_sum.wrapping_sub(face_id.as_u128());
        let (row, last, dim) = (row as usize, self.rows - 1, self.dim);
        let spill = {
            let (seg, i) = self.at(row);
            seg.spill[i]
        };
        self.free_vector(spill);
        if row != last {
            let (ls, li) = (last / SEGMENT_ROWS, last % SEGMENT_ROWS);
            let src = &self.segments[ls];
            let codes = src.codes[li * dim..(li + 1) * dim].to_vec();
            let (scale, slot, spill, id) = (
                src.scales[li],
                src.slots[li],
                src.spill[li],
                src.face_ids[li],
            );
            let (i, dst) = (
                row % SEGMENT_ROWS,
                Arc::make_mut(&mut self.segments[row / SEGMENT_ROWS]),
            );
            dst.codes[i * dim..(i + 1) * dim].copy_from_slice(&codes);
            dst.scales[i] = scale;
            dst.slots[i] = slot;
            dst.spill[i] = spill;
            dst.face_ids[i] = id;
            self.row_of.insert(id, row as u32);
        }
        let li = last % SEGMENT_ROWS;
        let seg = Arc::make_mut(&mut self.segments[last / SEGMENT_ROWS]);
        seg.codes.truncate(li * dim);
        seg.scales.truncate(li);
        seg.slots.truncate(li);
        seg.spill.truncate(li);
        seg.face_ids.truncate(li);
        if li == 0 {
            self.segments.pop();
        }
        self.rows = last;
        true
    }

    /// Writes an f32 vector to a free spill slot; `None` if the file refuses it.
    fn store_vector(&mut self, v: &[f32]) -> Option<u32> {
        self.reclaim_spill();
        if let Some(slot) = self.free_spill.pop() {
            // No snapshot can name a reclaimed slot, so rewriting it in place is safe.
            let start = self.vectors.tail.start;
            if slot >= start {
                let at = (slot - start) as usize * self.dim;
                Arc::make_mut(&mut self.vectors.tail).data[at..at + self.dim].copy_from_slice(v);
                return Some(slot);
            }
            return match self.vectors.file.write(slot, v) {
                Ok(()) => Some(slot),
                Err(e) => {
                    self.free_spill.push(slot);
                    tracing::error!(error = %e, "cannot write a face vector to the index spill file");
                    None
                }
            };
        }
        let slot = self.spill_slots;
        Arc::make_mut(&mut self.vectors.tail)
            .data
            .extend_from_slice(v);
        self.spill_slots += 1;
        let tail = &self.vectors.tail;
        if tail.data.len() >= TAIL_ROWS * self.dim {
            // On failure the rows stay in the tail (readable, just not on
            // disk) and the next full tail tries again.
            match self.vectors.file.write(tail.start, &tail.data) {
                Ok(()) => {
                    self.vectors.tail = Arc::new(Tail {
                        start: self.spill_slots,
                        data: Vec::with_capacity(TAIL_ROWS * self.dim),
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write face vectors to the index spill file")
                }
            }
        }
        Some(slot)
    }

    /// Snapshots taken so far may still read the slot: it waits for them.
    fn free_vector(&mut self, slot: u32) {
        if Arc::strong_count(&self.epoch) > 1 {
            let held = std::mem::replace(&mut self.epoch, Arc::new(()));
            self.retired.push_back((held, vec![slot]));
        } else if let Some((_, slots)) = self.retired.back_mut() {
            // Only older snapshots remain; the newest batch waits for all of them.
            slots.push(slot);
        } else {
            self.free_spill.push(slot);
        }
    }

    fn reclaim_spill(&mut self) {
        while let Some((epoch, _)) = self.retired.front() {
            if Arc::strong_count(epoch) > 1 {
                break;
            }
            if let Some((_, slots)) = self.retired.pop_front() {
                self.free_spill.extend(slots);
            }
        }
    }

    pub fn subject(&self, id: &Uuid) -> Option<&SubjectSlot> {
        self.slot_of
            .get(id)
            .and_then(|&s| self.subjects[s as usize].as_ref())
    }

    /// Best similarity of `query` over a subject's searchable faces, with the
    /// face that gave it (exact, from the f32 vectors); `None` when the subject
    /// has no searchable face.
    pub fn best_for_subject(&self, subject: &SubjectSlot, query: &[f32]) -> Option<(f32, Uuid)> {
        if query.len() != self.dim {
            return None;
        }
        let mut buf = vec![0f32; self.dim];
        let mut best: Option<(f32, Uuid)> = None;
        for f in &subject.faces {
            let Some(&row) = self.row_of.get(f) else {
                continue;
            };
            let (seg, i) = self.at(row as usize);
            if let Some(s) = self.vectors.exact(seg.spill[i], query, &mut buf) {
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, *f));
                }
            }
        }
        best
    }

    /// A view of the current rows for a search run outside the caller's lock.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            dim: self.dim,
            segments: self.segments.clone(),
            rows: self.rows,
            slots: self.subjects.len(),
            searchable: self.nonempty,
            vectors: self.vectors.clone(),
            max_scale: self.max_scale,
            _epoch: self.epoch.clone(),
        }
    }

    /// Names a snapshot search's candidates and keeps the `top_k` best
    /// (ties broken by subject id so the order is deterministic). A face
    /// deleted since the snapshot is left out.
    pub fn resolve(&self, candidates: Vec<Candidate>, top_k: usize) -> Vec<Hit> {
        let mut hits: Vec<Hit> = candidates
            .into_iter()
            .filter_map(|c| {
                let &row = self.row_of.get(&c.face_id)?;
                let (seg, i) = self.at(row as usize);
                let subj = self.subjects[seg.slots[i] as usize].as_ref()?;
                Some(Hit {
                    subject_id: subj.id,
                    name: subj.name.clone(),
                    similarity: c.similarity,
                    face_id: c.face_id,
                })
            })
            .collect();
        hits.sort_unstable_by(|a, b| {
            b.similarity
                .total_cmp(&a.similarity)
                .then_with(|| a.subject_id.cmp(&b.subject_id))
        });
        hits.truncate(top_k);
        hits
    }

    /// Exact 1:N search: every face is compared; a subject scores its best face;
    /// the `top_k` best subjects at or above `threshold` come back, best first
    /// (ties broken by subject id). Runs under the caller's borrow; a server
    /// uses `snapshot` and `resolve` to scan without holding its lock.
    pub fn search(&self, query: &[f32], top_k: usize, threshold: f32) -> Vec<Hit> {
        self.resolve(self.snapshot().search(query, top_k, threshold), top_k)
    }

    /// Checks every internal link; used by tests after mixed updates.
    #[cfg(test)]
    pub fn check_consistent(&self) {
        let rows: usize = self.segments.iter().map(|s| s.len()).sum();
        assert_eq!(rows, self.rows);
        assert_eq!(self.row_of.len(), self.rows);
        assert_eq!(self.id_sum, super::faces_digest(self.row_of.keys()));
        for (n, seg) in self.segments.iter().enumerate() {
            assert!(seg.len() <= SEGMENT_ROWS);
            if n + 1 < self.segments.len() {
                assert_eq!(seg.len(), SEGMENT_ROWS, "only the last segment is partial");
            }
            assert_eq!(seg.codes.len(), seg.len() * self.dim);
            assert_eq!(seg.scales.len(), seg.len());
            assert_eq!(seg.slots.len(), seg.len());
            assert_eq!(seg.spill.len(), seg.len());
        }
        let mut spill_seen = std::collections::HashSet::new();
        for row in 0..self.rows {
            let (seg, i) = self.at(row);
            let id = seg.face_ids[i];
            assert_eq!(self.row_of[&id] as usize, row);
            assert!(spill_seen.insert(seg.spill[i]), "spill slot shared");
            assert!(
                !self.free_spill.contains(&seg.spill[i]),
                "live slot is free"
            );
            let slot = self.subjects[seg.slots[i] as usize]
                .as_ref()
                .expect("row points at a live subject");
            assert!(slot.faces.contains(&id));
        }
        let nonempty = self
            .subjects
            .iter()
            .flatten()
            .filter(|s| !s.faces.is_empty())
            .count();
        assert_eq!(nonempty, self.nonempty);
        let listed: usize = self.subjects.iter().flatten().map(|s| s.faces.len()).sum();
        assert_eq!(listed, self.rows);
        for (id, &slot) in &self.slot_of {
            assert_eq!(
                self.subjects[slot as usize].as_ref().map(|s| s.id),
                Some(*id)
            );
        }
    }
}

impl Snapshot {
    /// Subjects with a searchable face when the snapshot was taken.
    pub fn searchable_subjects(&self) -> usize {
        self.searchable
    }

    /// Faces when the snapshot was taken.
    pub fn faces(&self) -> usize {
        self.rows
    }

    /// Largest possible gap between a face's code score and its exact f32
    /// score for this query: half a code step per face value (times |q|_1),
    /// half a query step per query value (times |x|_1 <= 127 * scale * dim),
    /// and the f32 rounding of the exact dot product (dim * eps relative; the
    /// code score's integer sum is exact, its two f32 products round once each).
    fn error_bound(&self, q: &[f32], codes: &QueryCodes) -> f32 {
        let l1: f32 = q.iter().map(|x| x.abs()).sum();
        let dim = self.dim as f32;
        let gamma = dim * f32::EPSILON;
        let face_codes = self.max_scale * l1 * 0.5;
        let query_codes = codes.scale * 0.5 * 127.0 * self.max_scale * dim;
        let rounding = gamma * 127.0 * self.max_scale * l1;
        (face_codes + query_codes + rounding) * 1.01 + 1e-6
    }

    /// Code scores of every row, in row order, on up to all cores.
    fn scan(&self, q: &QueryCodes) -> Vec<f32> {
        let mut scores = vec![0f32; self.rows];
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.rows / ROWS_PER_THREAD)
            .max(1);
        let chunks: Vec<(&Arc<Segment>, &mut [f32])> = self
            .segments
            .iter()
            .zip(scores.chunks_mut(SEGMENT_ROWS))
            .collect();
        if threads == 1 {
            for (seg, out) in chunks {
                scan_segment(seg, self.dim, q, out);
            }
            return scores;
        }
        let per = chunks.len().div_ceil(threads);
        let mut groups: Vec<Vec<(&Arc<Segment>, &mut [f32])>> = Vec::new();
        let mut it = chunks.into_iter().peekable();
        while it.peek().is_some() {
            groups.push(it.by_ref().take(per).collect());
        }
        std::thread::scope(|s| {
            let mut groups = groups.into_iter();
            let mine = groups.next();
            for g in groups {
                s.spawn(move || {
                    for (seg, out) in g {
                        scan_segment(seg, self.dim, q, out);
                    }
                });
            }
            for (seg, out) in mine.into_iter().flatten() {
                scan_segment(seg, self.dim, q, out);
            }
        });
        scores
    }

    /// The exact search of `Index::search` without names: each subject whose
    /// best face may be in the top `top_k` at or above `threshold`, with its
    /// exact best similarity. Every subject of the exact answer is in it, with
    /// the exact answer's face and similarity; pass it to `Index::resolve`.
    pub fn search(&self, query: &[f32], top_k: usize, threshold: f32) -> Vec<Candidate> {
        if top_k == 0 || query.len() != self.dim || self.rows == 0 {
            return Vec::new();
        }
        let codes = QueryCodes::new(query);
        let scores = self.scan(&codes);
        // Each subject's best code score; the k-th best of those is within
        // `bound` of the exact k-th best subject score.
        let mut best = vec![f32::NEG_INFINITY; self.slots];
        let slots = self.segments.iter().flat_map(|s| &s.slots);
        for (&slot, &s) in slots.zip(&scores) {
            let b = &mut best[slot as usize];
            *b = b.max(s);
        }
        let mut tops: Vec<f32> = best.into_iter().filter(|s| s.is_finite()).collect();
        let kth = if tops.len() >= top_k {
            let (_, kth, _) = tops.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f32::NEG_INFINITY
        };
        // A face whose exact score reaches the answer (at least the exact k-th
        // best and the threshold) has a code score at least this.
        let bound = self.error_bound(query, &codes);
        let cutoff = (kth - 2.0 * bound).max(threshold - bound);
        let mut exact: HashMap<u32, Candidate> = HashMap::new();
        let mut buf = vec![0f32; self.dim];
        for (row, _) in scores.iter().enumerate().filter(|(_, &s)| s >= cutoff) {
            let seg = &self.segments[row / SEGMENT_ROWS];
            let i = row % SEGMENT_ROWS;
            let (slot, spill, face_id) = (seg.slots[i], seg.spill[i], seg.face_ids[i]);
            let Some(similarity) = self.vectors.exact(spill, query, &mut buf) else {
                continue;
            };
            // A NaN (never stored by the gallery) is skipped too.
            if similarity.is_nan() || similarity < threshold {
                continue;
            }
            // Rows in order and a strict `>`: a subject's first best face wins, as in a plain scan.
            let e = exact.entry(slot).or_insert(Candidate {
                similarity: f32::NEG_INFINITY,
                face_id,
            });
            if similarity > e.similarity {
                *e = Candidate {
                    similarity,
                    face_id,
                };
            }
        }
        let mut out: Vec<Candidate> = exact.into_values().collect();
        out.sort_unstable_by(|a, b| b.similarity.total_cmp(&a.similarity));
        out
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

    #[test]
    fn code_dot_products_agree_with_plain_integer_sums() {
        let mut rng = StdRng::seed_from_u64(2);
        for len in [0, 1, 31, 32, 33, 63, 64, 65, 100, 512, 515] {
            let c: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            let q: Vec<i16> = (0..len).map(|_| rng.random_range(-32767..=32767)).collect();
            let want: i64 = c
                .iter()
                .zip(&q)
                .map(|(a, b)| i64::from(*a) * i64::from(*b))
                .sum();
            assert_eq!(i64::from(dot_codes(&c, &q)), want, "len {len}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 is present.
                assert_eq!(
                    i64::from(unsafe { dot_codes_avx2(&c, &q) }),
                    want,
                    "avx2, len {len}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                // SAFETY: both extensions are present.
                assert_eq!(
                    i64::from(unsafe { dot_codes_vnni(&c, &q) }),
                    want,
                    "vnni, len {len}"
                );
            }
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

    /// Exact f32 scan with the index's own `dot`: the answer must match it bit for bit.
    fn f32_scan(faces: &[(Uuid, Uuid, Vec<f32>)], q: &[f32], k: usize) -> Vec<(Uuid, f32, Uuid)> {
        let mut best: HashMap<Uuid, (f32, Uuid)> = HashMap::new();
        for (fid, sid, v) in faces {
            let s = dot(v, q);
            let e = best.entry(*sid).or_insert((f32::NEG_INFINITY, *fid));
            if s > e.0 {
                *e = (s, *fid);
            }
        }
        let mut all: Vec<(Uuid, f32, Uuid)> =
            best.into_iter().map(|(s, (v, f))| (s, v, f)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    #[test]
    fn near_ties_below_the_code_step_are_ranked_exactly() {
        // Faces a hair apart (1e-4 per value, far below one 8-bit step of
        // ~1e-3) get nearly the same code score; only the exact re-rank can
        // order them, and one missed by the short list would change the answer.
        let mut rng = StdRng::seed_from_u64(21);
        let base = unit(&mut rng, DIM);
        let mut idx = Index::new(DIM);
        let mut faces = Vec::new();
        for i in 0..(2 * SEGMENT_ROWS + 100) {
            let sid = Uuid::new_v4();
            idx.add_subject(sid, format!("s{i}"));
            let noise = unit(&mut rng, DIM);
            let amount = if i % 3 == 0 { 1e-4 } else { 0.8 };
            let mut v: Vec<f32> = base
                .iter()
                .zip(&noise)
                .map(|(a, b)| a + amount * b)
                .collect();
            let n = dot(&v, &v).sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            let fid = Uuid::new_v4();
            assert!(idx.add_face(fid, &sid, &v));
            faces.push((fid, sid, v));
        }
        for k in [1, 10, 100] {
            let got = idx.search(&base, k, -1.0);
            let want = f32_scan(&faces, &base, k);
            let got: Vec<(Uuid, f32, Uuid)> = got
                .iter()
                .map(|h| (h.subject_id, h.similarity, h.face_id))
                .collect();
            assert_eq!(got, want, "top-{k}");
        }
    }

    #[test]
    fn a_snapshot_keeps_its_faces_while_writers_reuse_their_slots() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut idx, mut faces, _) = build(&mut rng, 50, 600);
        let (gone, _, gone_v) = faces.swap_remove(17);
        let snap = idx.snapshot();
        // Deletes and enrolments go ahead while the snapshot is alive: they
        // copy what they touch instead of waiting for the search.
        assert!(idx.remove_face(&gone));
        let sid = faces[0].1;
        for _ in 0..TAIL_ROWS * 2 {
            let v = unit(&mut rng, DIM);
            let fid = Uuid::new_v4();
            assert!(idx.add_face(fid, &sid, &v));
            faces.push((fid, sid, v));
        }
        idx.check_consistent();
        // The snapshot still reads the deleted face's own vector (its slot was
        // not handed to a new face), and resolving drops it as deleted.
        let old = snap.search(&gone_v, 1, -1.0);
        assert_eq!(old[0].face_id, gone);
        assert_eq!(old[0].similarity, dot(&gone_v, &gone_v));
        assert!(idx.resolve(old, 1).iter().all(|h| h.face_id != gone));
        assert_eq!(snap.faces(), 600);
        drop(snap);
        // Once the snapshot is gone the slot is reused, and answers stay exact.
        let v = unit(&mut rng, DIM);
        let fid = Uuid::new_v4();
        assert!(idx.add_face(fid, &sid, &v));
        faces.push((fid, sid, v.clone()));
        assert!(idx.free_spill.is_empty() && idx.retired.is_empty());
        idx.check_consistent();
        for q in [v, gone_v, unit(&mut rng, DIM)] {
            assert_same(
                &idx.search(&q, 10, -1.0),
                &naive(&faces, |_| true, &q, 10, -1.0),
            );
        }
    }

    #[test]
    fn enrolment_is_not_stalled_by_concurrent_searches() {
        use std::sync::atomic::AtomicBool;
        use std::sync::RwLock;
        // Searches scan outside the lock (snapshot, scan, resolve), as the
        // gallery runs them; a writer interleaves adds and deletes meanwhile.
        let mut rng = StdRng::seed_from_u64(9);
        let (idx, faces, _) = build(&mut rng, 300, 3 * SEGMENT_ROWS);
        let lock = RwLock::new(idx);
        let done = AtomicBool::new(false);
        let queries: Vec<Vec<f32>> = (0..4).map(|_| unit(&mut rng, DIM)).collect();
        let mut faces = faces;
        std::thread::scope(|s| {
            for q in &queries {
                let (lock, done) = (&lock, &done);
                s.spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        let snap = lock.read().expect("lock").snapshot();
                        let cands = snap.search(q, 5, -1.0);
                        let hits = lock.read().expect("lock").resolve(cands, 5);
                        assert!(hits.windows(2).all(|w| w[0].similarity >= w[1].similarity));
                    }
                });
            }
            for i in 0..400 {
                let mut idx = lock.write().expect("lock");
                if i % 4 == 3 {
                    let (fid, _, _) = faces.swap_remove(rng.random_range(0..faces.len()));
                    assert!(idx.remove_face(&fid));
                } else {
                    let sid = faces[rng.random_range(0..faces.len())].1;
                    let v = unit(&mut rng, DIM);
                    let fid = Uuid::new_v4();
                    assert!(idx.add_face(fid, &sid, &v));
                    faces.push((fid, sid, v));
                }
            }
            done.store(true, Ordering::Relaxed);
        });
        let idx = lock.into_inner().expect("lock");
        idx.check_consistent();
        for q in &queries {
            assert_same(
                &idx.search(q, 20, -1.0),
                &naive(&faces, |_| true, q, 20, -1.0),
            );
        }
    }

    #[test]
    fn codes_round_to_nearest_within_half_a_step() {
        let mut codes = Vec::new();
        // Scale 1: halves go to the even neighbour, the rest to the nearest.
        let scale = quantise(&[127.0, 2.5, -2.5, 3.5, -126.6, 0.4, -0.0], &mut codes);
        assert_eq!(scale, 1.0);
        assert_eq!(codes, [127, 2, -2, 4, -127, 0, 0]);
        codes.clear();
        assert_eq!(quantise(&[0.0; 8], &mut codes), 0.0);
        assert_eq!(codes, [0; 8]);
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..200 {
            let v = unit(&mut rng, DIM);
            codes.clear();
            let scale = quantise(&v, &mut codes);
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert_eq!(scale, max / 127.0);
            for (x, c) in v.iter().zip(&codes) {
                let err = (f64::from(*x) - f64::from(scale) * f64::from(*c)).abs();
                assert!(err <= f64::from(scale) * 0.5 * (1.0 + 1e-6), "{x} -> {c}");
            }
        }
    }

    fn batch_of(rows: &[(Uuid, Uuid, Vec<f32>)]) -> FaceBatch {
        let mut b = FaceBatch::with_capacity(rows.len(), DIM);
        for (f, s, v) in rows {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert!(b.push(*f, *s, &bytes));
        }
        b
    }

    #[test]
    fn batches_build_the_index_add_face_builds() {
        let mut rng = StdRng::seed_from_u64(31);
        let subjects: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
        let mut rows: Vec<(Uuid, Uuid, Vec<f32>)> = (0..2 * SEGMENT_ROWS + 777)
            .map(|_| {
                let s = subjects[rng.random_range(0..subjects.len())];
                (Uuid::new_v4(), s, unit(&mut rng, DIM))
            })
            .collect();
        // Refusals: an unknown subject, a face id repeated inside one batch,
        // and one repeating a face of an earlier batch.
        rows[100].1 = Uuid::new_v4();
        rows[5000].0 = rows[4999].0;
        rows[6000].0 = rows[10].0;
        let (mut one, mut bulk) = (Index::new(DIM), Index::new(DIM));
        for (i, s) in subjects.iter().enumerate() {
            one.add_subject(*s, format!("s{i}"));
            bulk.add_subject(*s, format!("s{i}"));
        }
        let refused = rows
            .iter()
            .filter(|(f, s, v)| !one.add_face(*f, s, v))
            .count();
        assert_eq!(refused, 3);
        let mut bulk_refused = 0;
        // An odd batch size, so batches straddle segment boundaries.
        for chunk in rows.chunks(BATCH_ROWS - 3) {
            let mut b = batch_of(chunk);
            bulk_refused += bulk.add_batch_written(&mut b).expect("spill write");
        }
        assert_eq!(bulk_refused, refused);
        one.check_consistent();
        bulk.check_consistent();
        // Same rows, codes and spill slots, and the same vectors in the file.
        assert_eq!(
            (one.faces(), one.spill_slots),
            (bulk.faces(), bulk.spill_slots)
        );
        for (a, b) in one.segments.iter().zip(&bulk.segments) {
            assert_eq!(a.face_ids, b.face_ids);
            assert_eq!(a.codes, b.codes);
            assert_eq!(a.scales, b.scales);
            assert_eq!(a.slots, b.slots);
            assert_eq!(a.spill, b.spill);
        }
        let (mut va, mut vb) = (vec![0f32; DIM], vec![0f32; DIM]);
        for slot in 0..one.spill_slots {
            assert!(one.vectors.read(slot, &mut va) && bulk.vectors.read(slot, &mut vb));
            assert_eq!(va, vb, "spill slot {slot}");
        }
        // Later writes land after the batches' slots, and answers stay exact.
        let mut faces: Vec<_> = rows.clone();
        faces.remove(6000);
        faces.remove(5000);
        faces.remove(100);
        for idx in [&mut one, &mut bulk] {
            assert!(idx.remove_face(&faces[1].0));
        }
        faces.remove(1);
        for _ in 0..TAIL_ROWS + 5 {
            let (f, v) = (Uuid::new_v4(), unit(&mut rng, DIM));
            assert!(one.add_face(f, &subjects[0], &v) && bulk.add_face(f, &subjects[0], &v));
            faces.push((f, subjects[0], v));
        }
        bulk.check_consistent();
        for _ in 0..10 {
            let q = unit(&mut rng, DIM);
            let got = bulk.search(&q, 10, -1.0);
            assert_eq!(got, one.search(&q, 10, -1.0));
            let got: Vec<(Uuid, f32, Uuid)> = got
                .iter()
                .map(|h| (h.subject_id, h.similarity, h.face_id))
                .collect();
            assert_eq!(got, f32_scan(&faces, &q, 10));
        }
    }

    #[test]
    fn a_batch_after_deletes_reuses_the_freed_slots() {
        let mut rng = StdRng::seed_from_u64(32);
        let (mut idx, mut faces, _) = build(&mut rng, 50, 600);
        for _ in 0..10 {
            let (f, _, _) = faces.swap_remove(rng.random_range(0..faces.len()));
            assert!(idx.remove_face(&f));
        }
        let new: Vec<(Uuid, Uuid, Vec<f32>)> = (0..300)
            .map(|_| (Uuid::new_v4(), faces[0].1, unit(&mut rng, DIM)))
            .collect();
        assert_eq!(
            idx.add_batch_written(&mut batch_of(&new)).expect("write"),
            0
        );
        faces.extend(new);
        idx.check_consistent();
        assert_eq!(
            idx.spill_slots,
            600 + 300 - 10,
            "the 10 freed slots were reused"
        );
        for _ in 0..10 {
            let q = unit(&mut rng, DIM);
            assert_same(
                &idx.search(&q, 10, -1.0),
                &naive(&faces, |_| true, &q, 10, -1.0),
            );
        }
    }

    #[test]
    fn a_batch_refuses_vectors_of_the_wrong_length() {
        let mut b = FaceBatch::with_capacity(2, 4);
        assert!(!b.push(Uuid::new_v4(), Uuid::new_v4(), &[0u8; 12]));
        assert!(b.is_empty());
        // A batch made for another dimension is refused whole.
        let mut idx = Index::new(8);
        let s = Uuid::new_v4();
        idx.add_subject(s, "a".into());
        assert!(b.push(Uuid::new_v4(), s, &[0u8; 16]));
        assert_eq!(idx.add_batch_written(&mut b).expect("write"), 1);
        assert_eq!(idx.faces(), 0);
    }

    #[test]
    fn heap_holds_a_fraction_of_the_f32_vectors() {
        let mut rng = StdRng::seed_from_u64(3);
        let (idx, _, _) = build(&mut rng, 10, 2 * SEGMENT_ROWS);
        let f32_bytes = 2 * SEGMENT_ROWS * DIM * 4;
        assert!(
            idx.heap_bytes() < f32_bytes * 6 / 10,
            "{} of {f32_bytes}",
            idx.heap_bytes()
        );
        assert_eq!(idx.spill_bytes(), f32_bytes as u64);
    }
}
