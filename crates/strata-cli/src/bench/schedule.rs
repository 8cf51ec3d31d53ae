//! The request schedule: every arrival time, key, operation and instance, computed up
//! front from the seed so that every strategy is offered exactly the same load.

use std::time::Duration;

use anyhow::{Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::Scenario;

/// What one request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads the row (a UI-like client).
    Read,
    /// Changes the row through the app: commit, then invalidate through the strategy.
    Write {
        /// Which new value to write (an index into the scenario's values).
        value: u8,
        /// `payment` only: the instance on which the downstream consumer reads the row
        /// once it receives the "status changed" event. Never the writer's instance.
        consumer: Option<u32>,
    },
}

/// One scheduled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// When it is due, from the start of the run.
    pub at: Duration,
    /// The row id.
    pub key: u64,
    /// What it does.
    pub op: Op,
    /// The app instance that serves it.
    pub instance: u32,
}

/// What the schedule is generated from.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleParams {
    /// The scenario (decides whether writes are followed by a consumer read).
    pub scenario: Scenario,
    /// Length of the run.
    pub duration: Duration,
    /// Mean arrival rate, requests per second over the whole fleet.
    pub rate: f64,
    /// Number of rows; keys are `0..keys`, key 0 being the hottest.
    pub keys: u64,
    /// Zipf exponent of the key popularity (0 = uniform).
    pub zipf: f64,
    /// Fraction of requests that are writes.
    pub write_ratio: f64,
    /// Fraction of requests sent to the hottest key on top of the Zipf draw (a hot-key
    /// skew; 0 for none).
    pub hot_key_share: f64,
    /// Number of app instances.
    pub instances: u32,
    /// The seed.
    pub seed: u64,
}

/// A fixed, seeded request schedule (open loop: arrivals do not wait for completions).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The requests, by arrival time.
    pub requests: Vec<Request>,
    /// Number of rows.
    pub keys: u64,
}

/// The number of distinct values a write can set.
pub const VALUES: u8 = 4;

impl Schedule {
    /// Generates the schedule: Poisson arrivals at `rate`, Zipf-distributed keys (the
    /// same distribution for reads and writes), a uniformly chosen instance per request.
    pub fn generate(p: &ScheduleParams) -> Result<Schedule> {
        ensure!(p.rate > 0.0 && p.rate.is_finite(), "--rate must be positive, got {}", p.rate);
        ensure!(p.keys > 0, "--keys must be at least 1");
        ensure!(p.instances > 0, "--instances must be at least 1");
        ensure!(p.zipf >= 0.0 && p.zipf.is_finite(), "--zipf must be ≥ 0, got {}", p.zipf);
        ensure!(
            (0.0..=1.0).contains(&p.write_ratio),
            "--write-ratio must be in 0..=1, got {}",
            p.write_ratio
        );
        ensure!(
            (0.0..=1.0).contains(&p.hot_key_share),
            "--hot-key-share must be in 0..=1, got {}",
            p.hot_key_share
        );
        ensure!(
            p.scenario != Scenario::Payment || p.instances >= 2,
            "the payment scenario needs at least 2 instances (the consumer reads on another instance than the writer)"
        );
        let zipf = Zipf::new(p.keys, p.zipf);
        let mut rng = StdRng::seed_from_u64(p.seed);
        let end = p.duration.as_secs_f64();
        let mut requests = Vec::with_capacity((p.rate * end * 1.05) as usize + 16);
        let mut t = 0.0f64;
        loop {
            // Exponential inter-arrival times: 1 - u is in (0, 1], so ln is finite.
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / p.rate;
            if t >= end {
                break;
            }
            // The skew draws only when asked, so schedules without it stay as they were.
            let key = if p.hot_key_share > 0.0 && rng.random::<f64>() < p.hot_key_share {
                0
            } else {
                zipf.sample(rng.random())
            };
            let instance = rng.random_range(0..p.instances);
            let op = if rng.random::<f64>() < p.write_ratio {
                let value = rng.random_range(0..VALUES);
                let consumer = (p.scenario == Scenario::Payment).then(|| {
                    // Any instance but the writer's.
                    let other = rng.random_range(0..p.instances - 1);
                    if other >= instance { other + 1 } else { other }
                });
                Op::Write { value, consumer }
            } else {
                Op::Read
            };
            requests.push(Request { at: Duration::from_secs_f64(t), key, op, instance });
        }
        Ok(Schedule { requests, keys: p.keys })
    }

    /// The hottest key (rank 1 of the Zipf distribution).
    pub fn hottest_key(&self) -> u64 {
        0
    }

    /// Reads in the schedule (UI-like clients; consumer reads not included).
    pub fn reads(&self) -> u64 {
        self.requests.iter().filter(|r| r.op == Op::Read).count() as u64
    }

    /// Reads of the downstream consumer: one per `payment` write.
    pub fn consumer_reads(&self) -> u64 {
        self.requests.iter().filter(|r| matches!(r.op, Op::Write { consumer: Some(_), .. })).count() as u64
    }

    /// Writes in the schedule.
    pub fn writes(&self) -> u64 {
        self.requests.iter().filter(|r| matches!(r.op, Op::Write { .. })).count() as u64
    }

    /// Writes of `key`.
    pub fn writes_of(&self, key: u64) -> u64 {
        self.requests.iter().filter(|r| r.key == key && matches!(r.op, Op::Write { .. })).count() as u64
    }

    /// The compulsory DB reads: what a perfect cache shared by the whole fleet would
    /// still have to load, in schedule order. A read needs the DB when its key was never
    /// read before, or when the key was written since the last time it was loaded. A
    /// consumer read follows its write.
    pub fn compulsory_db_reads(&self) -> u64 {
        self.loads_after(&mut self.key_marks(false))
    }

    /// One mark per key (at most 2^32), each `served`: the cache state
    /// [`loads_after`](Self::loads_after) reads and updates.
    pub fn key_marks(&self, served: bool) -> Vec<bool> {
        vec![served; usize::try_from(self.keys).unwrap_or(usize::MAX).min(1 << 32)]
    }

    /// The DB reads a perfect fleet-shared cache holding the keys marked in `served`
    /// makes for this schedule; `served` is updated (a read caches its key, a write
    /// drops it unless a consumer reads it right after).
    pub fn loads_after(&self, served: &mut [bool]) -> u64 {
        let mut loads = 0u64;
        for r in &self.requests {
            let Some(slot) = served.get_mut(r.key as usize) else { continue };
            let load = match r.op {
                Op::Read => !std::mem::replace(slot, true),
                Op::Write { consumer, .. } => {
                    *slot = consumer.is_some();
                    consumer.is_some()
                }
            };
            loads += u64::from(load);
        }
        loads
    }
}

/// A Zipf sampler over ranks `0..n` by inverse CDF (exact, O(log n) per draw).
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// P(rank k) ∝ 1 / (k + 1)^s.
    pub fn new(n: u64, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for k in 0..n {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    /// The rank for a uniform draw `u` in `[0, 1)`.
    pub fn sample(&self, u: f64) -> u64 {
        let i = self.cdf.partition_point(|&c| c <= u);
        i.min(self.cdf.len().saturating_sub(1)) as u64
    }

    /// The probability of `rank`.
    #[cfg(test)]
    pub fn probability(&self, rank: u64) -> f64 {
        let i = rank as usize;
        match i {
            0 => self.cdf.first().copied().unwrap_or(0.0),
            _ => self.cdf.get(i).copied().unwrap_or(1.0) - self.cdf.get(i - 1).copied().unwrap_or(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64) -> ScheduleParams {
        ScheduleParams {
            hot_key_share: 0.0,
            scenario: Scenario::Payment,
            duration: Duration::from_secs(3),
            rate: 1000.0,
            keys: 500,
            zipf: 1.0,
            write_ratio: 0.05,
            instances: 7,
            seed,
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = Schedule::generate(&params(42)).unwrap();
        let b = Schedule::generate(&params(42)).unwrap();
        assert_eq!(a, b);
        let c = Schedule::generate(&params(43)).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn schedule_has_the_asked_shape() {
        let s = Schedule::generate(&params(1)).unwrap();
        let n = s.requests.len() as f64;
        assert!((2700.0..3300.0).contains(&n), "{n} requests for 3 s at 1000/s");
        assert!(s.requests.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(s.requests.iter().all(|r| r.at < Duration::from_secs(3) && r.key < 500 && r.instance < 7));
        let writes = s.writes() as f64;
        assert!((0.03 * n..0.07 * n).contains(&writes), "{writes} writes of {n}");
        for r in &s.requests {
            if let Op::Write { consumer, .. } = r.op {
                let c = consumer.unwrap();
                assert!(c != r.instance && c < 7);
            }
        }
        // Key 0 is the hottest: ~1/H(500) ≈ 14.7 % of requests.
        let hot = s.requests.iter().filter(|r| r.key == 0).count() as f64 / n;
        assert!((0.12..0.18).contains(&hot), "hottest key share {hot}");
    }

    #[test]
    fn compulsory_reads_count_first_reads_and_reads_after_writes() {
        let r = |key, op| Request { at: Duration::ZERO, key, op, instance: 0 };
        let w = Op::Write { value: 1, consumer: None };
        let s = Schedule {
            keys: 3,
            requests: vec![
                r(0, Op::Read), // first read: 1
                r(0, Op::Read),
                r(1, w),        // write before any read
                r(1, Op::Read), // 2
                r(0, w),
                r(0, w),
                r(0, Op::Read),                                  // 3 (two writes, one reload)
                r(2, w),                                         // never read again
                r(1, Op::Write { value: 0, consumer: Some(1) }), // consumer read: 4
                r(1, Op::Read),
            ],
        };
        assert_eq!(s.compulsory_db_reads(), 4);
        assert_eq!(s.reads(), 5);
        assert_eq!(s.consumer_reads(), 1);
        assert_eq!(s.writes(), 5);
    }

    #[test]
    fn zipf_zero_is_uniform_and_samples_stay_in_range() {
        let z = Zipf::new(4, 0.0);
        for k in 0..4 {
            assert!((z.probability(k) - 0.25).abs() < 1e-12);
        }
        assert_eq!(z.sample(0.0), 0);
        assert_eq!(z.sample(0.999_999), 3);
        assert_eq!(z.sample(0.26), 1);
    }
}
