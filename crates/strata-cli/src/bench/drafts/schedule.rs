//! The drafts schedule: every user's saves, heartbeats and reads from another device,
//! drawn from the seed before the run so that every strategy gets the same one.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How often an active user's client sends a heartbeat (`touch`).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// One request of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The user's client saves revision `rev` of the draft through `instance`.
    Save { user: u64, rev: u64, instance: usize },
    /// The user opens the draft on another device, served by `instance`.
    Read { user: u64, instance: usize },
    /// The client's heartbeat through `instance` (the sliding TTL).
    Touch { user: u64, instance: usize },
}

/// An event and when it is due, from the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// When it is due.
    pub at: Duration,
    /// What it is.
    pub event: Event,
}

/// The schedule's knobs.
#[derive(Debug, Clone, Copy)]
pub struct DraftParams {
    /// Users, one draft each.
    pub users: u64,
    /// Instances serving them.
    pub instances: usize,
    /// Length of the run.
    pub duration: Duration,
    /// Chance that a save is followed, 50–300 ms later, by a read on another instance.
    pub read_after_save: f64,
    /// The seed.
    pub seed: u64,
}

/// Every event of the run, in time order, and the number of saves.
pub fn generate(p: &DraftParams) -> (Vec<Timed>, u64) {
    let mut rng = SmallRng::seed_from_u64(p.seed);
    let mut out = Vec::new();
    let mut saves = 0;
    let total = p.duration.as_secs_f64();
    let other = |rng: &mut SmallRng, home: usize| {
        if p.instances < 2 {
            return home;
        }
        (home + rng.random_range(1..p.instances)) % p.instances
    };
    for user in 0..p.users {
        let home = rng.random_range(0..p.instances.max(1));
        // A tenth of the users stay all run; the others go idle somewhere in it.
        let active_until = if rng.random_bool(0.1) { total } else { total * rng.random_range(0.3..1.0) };
        let mut t = rng.random_range(0.0..1.5);
        let mut rev = 0;
        let mut next_beat = t + HEARTBEAT_EVERY.as_secs_f64();
        while t < active_until {
            rev += 1;
            saves += 1;
            out.push(Timed {
                at: Duration::from_secs_f64(t),
                event: Event::Save { user, rev, instance: home },
            });
            if rng.random_bool(p.read_after_save) {
                let at = t + rng.random_range(0.05..0.3);
                let instance = other(&mut rng, home);
                out.push(Timed { at: Duration::from_secs_f64(at), event: Event::Read { user, instance } });
            }
            t += rng.random_range(1.0..2.0);
            while next_beat < t.min(active_until) {
                out.push(Timed {
                    at: Duration::from_secs_f64(next_beat),
                    event: Event::Touch { user, instance: home },
                });
                next_beat += HEARTBEAT_EVERY.as_secs_f64();
            }
        }
        if active_until < total {
            // Later, the user opens the idle draft on another device.
            let at = rng.random_range(active_until..total);
            let instance = other(&mut rng, home);
            out.push(Timed { at: Duration::from_secs_f64(at), event: Event::Read { user, instance } });
        }
    }
    out.retain(|e| e.at < p.duration);
    out.sort_by_key(|e| e.at);
    (out, saves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_saves_come_every_one_to_two_seconds() {
        let p = DraftParams {
            users: 50,
            instances: 4,
            duration: Duration::from_secs(20),
            read_after_save: 0.1,
            seed: 7,
        };
        let (a, saves) = generate(&p);
        let (b, _) = generate(&p);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.at == y.at && x.event == y.event));
        let user0: Vec<Duration> = a
            .iter()
            .filter_map(|e| match e.event {
                Event::Save { user: 0, .. } => Some(e.at),
                _ => None,
            })
            .collect();
        assert!(user0.windows(2).all(|w| (1.0..2.0).contains(&(w[1] - w[0]).as_secs_f64())));
        assert!(saves > 50 * 4, "every user saves a few times: {saves}");
        let reads_elsewhere = a.iter().all(|e| match e.event {
            Event::Read { user, instance } => a.iter().any(
                |s| matches!(s.event, Event::Save { user: u, instance: i, .. } if u == user && i != instance),
            ),
            _ => true,
        });
        assert!(reads_elsewhere, "reads come from another device");
    }
}
