//! Pushed reloads (`CacheBuilder::push_reloads`): the instance that reloads a key after
//! another's invalidation sends the entry; the instances that held the key install it,
//! unless anything about the key happened here since that invalidation.

use std::time::Duration;

use strata::backplane::Mode;

use crate::support::{Db, eventually, fleet, held_everywhere_then_written};

#[tokio::test]
async fn a_reload_reaches_the_instances_that_held_the_key_without_an_l2_read() {
    let f = fleet(4, Mode::Stream, None).await;
    let (writer, reloader) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1"), (2, "w1")]);
    for c in &f.caches[..3] {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    db.set(1, "v2");
    writer.invalidate(&1).await.expect("invalidate");
    for c in &f.caches[1..] {
        eventually("applied", || c.stats().invalidations_applied == 1).await;
    }
    assert_eq!(reloader.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    eventually("pushed", || reloader.stats().reloads_pushed == 1).await;
    let holder = &f.caches[2];
    eventually("installed", || holder.stats().reloads_installed == 1).await;
    let before = holder.stats();
    assert_eq!(holder.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    let after = holder.stats();
    assert_eq!(
        (after.l1_hits - before.l1_hits, after.l2_hits, after.loads),
        (1, before.l2_hits, before.loads)
    );
    // The instance that never held the key, and the writer (whose own write it was),
    // install nothing.
    assert_eq!(f.caches[3].stats().reloads_installed, 0);
    assert_eq!(f.caches[3].get_local(&1), None);
    assert_eq!(writer.stats().reloads_installed, 0);
    assert_eq!(writer.get_local(&1), None);
}

#[tokio::test]
async fn a_write_of_the_receivers_own_since_the_invalidation_refuses_the_reload() {
    let f = fleet(3, Mode::Stream, None).await;
    let (reloader, receiver) = (&f.caches[1], &f.caches[2]);
    let db = held_everywhere_then_written(&f).await;
    // The push reaches the receiver late; before it does, the receiver writes v3.
    f.conns[2].faults().set_delay(Duration::from_millis(40));
    assert_eq!(reloader.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    eventually("pushed", || reloader.stats().reloads_pushed == 1).await;
    db.set(1, "v3");
    receiver.invalidate(&1).await.expect("invalidate");
    f.conns[2].faults().set_delay(Duration::ZERO);
    eventually("the push arrived", || receiver.stats().reloads_refused == 1).await;
    assert_eq!((receiver.stats().reloads_installed, receiver.stats().repairs_flushed), (0, 0));
    assert_eq!(receiver.get_local(&1), None, "v2 must not come back after the write of v3");
    assert_eq!(receiver.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v3"));
}

#[tokio::test]
async fn pushing_reloads_off_keeps_every_instance_reading_l2() {
    let f = crate::support::fleet_with(3, Mode::Stream, |b| b.push_reloads(0)).await;
    let db = held_everywhere_then_written(&f).await;
    f.caches[1].get_or_load(&1, db.loader(1)).await.expect("reload");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((f.caches[1].stats().reloads_pushed, f.caches[2].stats().reloads_installed), (0, 0));
    assert_eq!(f.caches[2].get_local(&1), None);
}

#[tokio::test]
async fn an_own_write_stops_holding_reloads_back_once_its_message_came_back() {
    let f = fleet(3, Mode::Stream, None).await;
    let (writer, reloader, receiver) = (&f.caches[0], &f.caches[1], &f.caches[2]);
    let db = Db::with(&[(1, "v1")]);
    for c in &f.caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    db.set(1, "v2");
    receiver.invalidate(&1).await.expect("invalidate");
    for c in [writer, reloader] {
        eventually("applied", || c.stats().invalidations_applied == 1).await;
    }
    // The receiver's own message has come back by now (one hub, one order).
    tokio::time::sleep(Duration::from_millis(20)).await;
    db.set(1, "v3");
    writer.invalidate(&1).await.expect("invalidate");
    eventually("applied", || receiver.stats().invalidations_applied == 1).await;
    eventually("applied", || reloader.stats().invalidations_applied == 2).await;
    assert_eq!(reloader.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v3"));
    eventually("installed", || receiver.stats().reloads_installed == 1).await;
    assert_eq!(receiver.get_local(&1).as_deref(), Some("v3"));
}
