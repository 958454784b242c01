//! Cross-request dynamic batching.
//!
//! Requests wait in one bounded queue; each inference worker (an OS thread
//! owning its own backend) takes everything that is waiting, up to
//! `max_batch` images, and runs it as one batch. With the default delay of 0 a
//! worker never waits for a batch to fill: on a CPU, where larger batches barely
//! raise throughput, a lone request runs at once, while under load requests
//! that arrived during the previous run are batched together for free. On a GPU
//! a small `max_batch_delay` trades a little latency for fuller batches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backend::{Backend, IMAGE_LEN};
use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;

/// One request's images, already preprocessed, waiting for a worker.
pub struct Job {
    pub input: Vec<f32>,
    pub images: usize,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Vec<f32>, ApiError>>,
    /// The request's span, so inference logs carry its request id.
    pub span: tracing::Span,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
}

/// Counters the batcher keeps about itself (also exported as metrics).
#[derive(Debug, Default)]
pub struct BatchStats {
    pub runs: AtomicU64,
    pub images: AtomicU64,
    pub largest_run: AtomicU64,
    /// Runs that combined the images of more than one request.
    pub merged_runs: AtomicU64,
    /// Jobs dropped before inference because their caller had gone.
    pub abandoned: AtomicU64,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Workers waiting for work right now.
    idle: usize,
}

pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                idle: 0,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-batch leaves the queue itself consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enqueues at once or refuses at once: callers never wait for room.
    pub fn push(&self, job: Job) -> Result<(), ApiError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "the inference engine is shutting down",
            ));
        }
        if st.jobs.len() >= self.capacity {
            return Err(ApiError::new(
                ErrorKind::QueueFull,
                format!(
                    "inference queue is full ({} requests waiting); retry shortly",
                    self.capacity
                ),
            ));
        }
        st.jobs.push_back(job);
        self.metrics.queue_depth.set(st.jobs.len() as i64);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Into how many jobs to cut a request of `images` images: one per idle
    /// worker when nothing else is waiting, else one. A lone face and its
    /// mirror then run on two cores at once (each worker runs one intra-op
    /// thread, the layout that wins under load), so a single caller gets the
    /// latency of a two-threaded run; under load nothing is cut and each run
    /// keeps the cheaper batch of two.
    pub fn spread(&self, images: usize) -> usize {
        let st = self.lock();
        if st.jobs.is_empty() {
            st.idle.clamp(1, images.max(1))
        } else {
            1
        }
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Blocks until work is waiting, then takes jobs in arrival order up to
    /// `max_batch` images (always at least one job, however large). Returns
    /// `None` once the queue is closed and drained.
    pub fn next_batch(&self, cfg: &BatchConfig) -> Option<Vec<Job>> {
        let mut st = self.lock();
        while st.jobs.is_empty() {
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
        let mut batch = Vec::new();
        let mut images = 0;
        let deadline = Instant::now() + cfg.max_delay;
        loop {
            while let Some(front) = st.jobs.front() {
                // An idle worker runs the next job beside this one, sooner than a
                // merged batch would (the parts `spread` cut rely on it).
                if !batch.is_empty() && (images + front.images > cfg.max_batch || st.idle > 0) {
                    break;
                }
                images += front.images;
                batch.extend(st.jobs.pop_front());
            }
            let full = images >= cfg.max_batch || !st.jobs.is_empty();
            let now = Instant::now();
            if full || st.closed || now >= deadline {
                break;
            }
            st = self
                .ready
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.metrics.queue_depth.set(st.jobs.len() as i64);
        // Another worker may be able to take what is left.
        if !st.jobs.is_empty() {
            self.ready.notify_one();
        }
        Some(batch)
    }
}

/// The body of one inference thread: runs until the queue is closed.
pub fn worker_loop<B: Backend>(
    mut backend: B,
    queue: Arc<Queue>,
    cfg: BatchConfig,
    dim: usize,
    metrics: Arc<Metrics>,
    stats: Arc<BatchStats>,
) {
    while let Some(batch) = queue.next_batch(&cfg) {
        let started = Instant::now();
        let mut live: Vec<Job> = Vec::with_capacity(batch.len());
        for job in batch {
            metrics
                .queue_wait
                .observe(started.duration_since(job.enqueued).as_secs_f64());
            // The caller timed out or disconnected: its answer would be thrown away.
            if job.reply.is_closed() {
                stats.abandoned.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            live.push(job);
        }
        if live.is_empty() {
            continue;
        }
        let total: usize = live.iter().map(|j| j.images).sum();
        let mut input = Vec::with_capacity(total * IMAGE_LEN);
        for job in &live {
            input.extend_from_slice(&job.input);
        }
        if live.len() > 1 {
            stats.merged_runs.fetch_add(1, Ordering::Relaxed);
        }
        let result = run_chunked(
            &mut backend,
            &input,
            total,
            cfg.max_batch,
            dim,
            &metrics,
            &stats,
        );
        let mut offset = 0;
        for job in live {
            let _enter = job.span.enter();
            let n = job.images * dim;
            let answer = match &result {
                Ok(out) => Ok(out[offset..offset + n].to_vec()),
                Err(e) => Err(e.clone()),
            };
            offset += n;
            tracing::debug!(images = job.images, batch = total, "inference done");
            // The caller may have gone since the check above; nothing to do then.
            let _ = job.reply.send(answer);
        }
    }
}

/// A single request may hold more images than `max_batch`; it then runs in
/// several model calls so GPU memory use stays bounded.
fn run_chunked<B: Backend>(
    backend: &mut B,
    input: &[f32],
    total: usize,
    max_batch: usize,
    dim: usize,
    metrics: &Metrics,
    stats: &BatchStats,
) -> Result<Vec<f32>, ApiError> {
    let mut out = Vec::with_capacity(total * dim);
    let chunk = max_batch.max(1);
    let mut start = 0;
    while start < total {
        let n = chunk.min(total - start);
        let t = Instant::now();
        let features = backend
            .run(&input[start * IMAGE_LEN..(start + n) * IMAGE_LEN], n)
            .map_err(ApiError::internal)?;
        if features.len() != n * dim {
            return Err(ApiError::internal(format!(
                "backend returned {} values for {n} images of dim {dim}",
                features.len()
            )));
        }
        metrics
            .inference_duration
            .observe(t.elapsed().as_secs_f64());
        metrics.batch_size.observe(n as f64);
        stats.runs.fetch_add(1, Ordering::Relaxed);
        stats.images.fetch_add(n as u64, Ordering::Relaxed);
        stats.largest_run.fetch_max(n as u64, Ordering::Relaxed);
        out.extend_from_slice(&features);
        start += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes the first value of each image into every output slot and records batch sizes.
    struct FakeBackend {
        dim: usize,
        sizes: Arc<Mutex<Vec<usize>>>,
    }

    impl Backend for FakeBackend {
        fn run(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
            self.sizes.lock().unwrap().push(n);
            Ok((0..n)
                .flat_map(|i| std::iter::repeat_n(input[i * IMAGE_LEN], self.dim))
                .collect())
        }
    }

    fn job(value: f32, images: usize) -> (Job, oneshot::Receiver<Result<Vec<f32>, ApiError>>) {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            input: vec![value; images * IMAGE_LEN],
            images,
            enqueued: Instant::now(),
            reply: tx,
            span: tracing::Span::none(),
        };
        (job, rx)
    }

    /// A queue with a fake worker that starts only when asked, so tests can
    /// fill the queue first.
    struct Harness {
        queue: Arc<Queue>,
        sizes: Arc<Mutex<Vec<usize>>>,
        stats: Arc<BatchStats>,
        metrics: Arc<Metrics>,
        cfg: BatchConfig,
    }

    impl Harness {
        fn new(max_batch: usize, max_delay: Duration, capacity: usize) -> Self {
            let metrics = Arc::new(Metrics::new());
            Self {
                queue: Arc::new(Queue::new(capacity, metrics.clone())),
                sizes: Arc::new(Mutex::new(Vec::new())),
                stats: Arc::new(BatchStats::default()),
                metrics,
                cfg: BatchConfig {
                    max_batch,
                    max_delay,
                },
            }
        }

        fn run(&self) -> std::thread::JoinHandle<()> {
            let backend = FakeBackend {
                dim: 2,
                sizes: self.sizes.clone(),
            };
            let (q, m, s, cfg) = (
                self.queue.clone(),
                self.metrics.clone(),
                self.stats.clone(),
                self.cfg,
            );
            std::thread::spawn(move || worker_loop(backend, q, cfg, 2, m, s))
        }

        fn finish(&self, handle: std::thread::JoinHandle<()>) -> Vec<usize> {
            self.queue.close();
            handle.join().unwrap();
            self.sizes.lock().unwrap().clone()
        }
    }

    #[test]
    fn a_lone_request_is_spread_over_the_idle_workers_only() {
        let h = Harness::new(2, Duration::ZERO, 16);
        assert_eq!(h.queue.spread(2), 1, "no worker is idle");
        let workers = [h.run(), h.run()];
        let start = Instant::now();
        let both_idle = || {
            while h.queue.lock().idle < 2 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "workers never went idle"
                );
                std::thread::yield_now();
            }
        };
        both_idle();
        assert_eq!(h.queue.spread(2), 2);
        assert_eq!(h.queue.spread(16), 2, "never more parts than idle workers");
        assert_eq!(h.queue.spread(1), 1, "never more parts than images");
        // Two parts run on the two workers, not merged into one batch.
        let (a, ra) = job(1.0, 1);
        let (b, rb) = job(2.0, 1);
        // Both waiting before any worker wakes: one worker could take both.
        h.queue.lock().jobs.extend([a, b]);
        h.queue.ready.notify_all();
        assert_eq!(ra.blocking_recv().unwrap().unwrap(), vec![1.0, 1.0]);
        assert_eq!(rb.blocking_recv().unwrap().unwrap(), vec![2.0, 2.0]);
        assert_eq!(*h.sizes.lock().unwrap(), vec![1, 1]);
        both_idle();
        // Work already waiting: the idle workers are about to take it.
        let (waiting, _rx) = job(1.0, 2);
        h.queue.lock().jobs.push_back(waiting);
        assert_eq!(h.queue.spread(2), 1);
        h.queue.lock().jobs.clear();
        h.queue.close();
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn waiting_jobs_are_merged_up_to_max_batch_and_answered_in_order() {
        let h = Harness::new(4, Duration::ZERO, 16);
        let mut rxs = Vec::new();
        // Enqueue before the worker runs so they are all waiting together.
        for v in 0..5 {
            let (j, rx) = job(v as f32, 2);
            h.queue.push(j).unwrap();
            rxs.push(rx);
        }
        let handle = h.run();
        for (v, rx) in rxs.into_iter().enumerate() {
            let out = rx.blocking_recv().unwrap().unwrap();
            assert_eq!(out, vec![v as f32; 4], "job {v} got another job's features");
        }
        assert_eq!(h.finish(handle), vec![4, 4, 2]);
        assert_eq!(h.stats.merged_runs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_job_larger_than_max_batch_runs_in_chunks() {
        let h = Harness::new(4, Duration::ZERO, 4);
        let handle = h.run();
        let (j, rx) = job(7.0, 10);
        h.queue.push(j).unwrap();
        assert_eq!(rx.blocking_recv().unwrap().unwrap().len(), 20);
        assert_eq!(h.finish(handle), vec![4, 4, 2]);
    }

    #[test]
    fn full_queue_refuses_at_once() {
        let metrics = Arc::new(Metrics::new());
        let queue = Queue::new(2, metrics);
        let (a, _ra) = job(0.0, 1);
        let (b, _rb) = job(0.0, 1);
        let (c, _rc) = job(0.0, 1);
        queue.push(a).unwrap();
        queue.push(b).unwrap();
        let err = queue.push(c).unwrap_err();
        assert_eq!(err.kind, ErrorKind::QueueFull);
    }

    #[test]
    fn jobs_whose_caller_left_are_skipped() {
        let h = Harness::new(8, Duration::ZERO, 8);
        let (gone, rx_gone) = job(1.0, 1);
        let (kept, rx_kept) = job(2.0, 1);
        h.queue.push(gone).unwrap();
        h.queue.push(kept).unwrap();
        drop(rx_gone);
        let handle = h.run();
        assert_eq!(rx_kept.blocking_recv().unwrap().unwrap(), vec![2.0, 2.0]);
        assert_eq!(
            h.finish(handle),
            vec![1],
            "the abandoned job must not reach the model"
        );
        assert_eq!(h.stats.abandoned.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn delay_lets_a_worker_wait_for_a_fuller_batch() {
        let h = Harness::new(4, Duration::from_millis(300), 8);
        let handle = h.run();
        let (a, ra) = job(1.0, 1);
        h.queue.push(a).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let (b, rb) = job(2.0, 1);
        h.queue.push(b).unwrap();
        ra.blocking_recv().unwrap().unwrap();
        rb.blocking_recv().unwrap().unwrap();
        assert_eq!(h.finish(handle), vec![2], "both jobs should share one run");
    }

    #[test]
    fn without_delay_a_lone_job_runs_alone() {
        let h = Harness::new(4, Duration::ZERO, 8);
        let handle = h.run();
        let (a, ra) = job(1.0, 1);
        h.queue.push(a).unwrap();
        ra.blocking_recv().unwrap().unwrap();
        assert_eq!(h.finish(handle), vec![1]);
    }

    #[test]
    fn closed_queue_refuses_and_stops_workers() {
        let h = Harness::new(4, Duration::ZERO, 8);
        let handle = h.run();
        assert!(h.finish(handle).is_empty());
        let (a, _ra) = job(1.0, 1);
        assert_eq!(h.queue.push(a).unwrap_err().kind, ErrorKind::Unavailable);
    }
}
