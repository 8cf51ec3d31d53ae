//! The seed stories a bench run can play, and what each one writes.

/// A seed story.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Read-heavy subscription settings: every request reads one settings row; a small
    /// rate of plan changes, written through the app with invalidation.
    Billsetting,
    /// Payment status: PENDING → COMPLETED/FAILED committed through the app; UI-like
    /// reads, plus a downstream consumer that reads the row on another instance as soon
    /// as it receives the "status changed" event (emitted after the invalidation).
    Payment,
    /// Draft autosave (write-heavy): users save a draft every 1–2 s while active, with a
    /// heartbeat, and read it from another device now and then; the strategies are
    /// write-through, the seed's naive write-behind and strata's write-behind
    /// (`strata::write_behind`). See `strata bench --scenario drafts --help`.
    Drafts,
}

impl Scenario {
    /// The scenario's name (also its table and cache namespace).
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Billsetting => "billsetting",
            Scenario::Payment => "payment",
            Scenario::Drafts => "drafts",
        }
    }

    /// The values a write sets, by the schedule's value index.
    pub fn values(self) -> [&'static str; 4] {
        match self {
            Scenario::Billsetting => ["basic", "pro", "team", "enterprise"],
            Scenario::Payment => ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"],
            Scenario::Drafts => ["draft", "draft", "draft", "draft"],
        }
    }

    /// The default `--write-ratio`.
    pub fn default_write_ratio(self) -> f64 {
        match self {
            Scenario::Billsetting => 0.002,
            Scenario::Payment => 0.05,
            Scenario::Drafts => 1.0,
        }
    }

    /// How much faster than real time the warm-up before the steady window runs
    /// unless `--warm-up-speed` says otherwise (see [`super::steady`]).
    pub fn default_warm_up_speed(self) -> f64 {
        match self {
            Scenario::Payment => super::steady::PAYMENT_WARM_UP_SPEED,
            Scenario::Billsetting | Scenario::Drafts => super::steady::WARM_UP_SPEED,
        }
    }
}
