//! Who is connected to this process: connections per client address and per user (for their
//! limits), per device (so a revoked device's sockets close at once), and per user again with
//! their queues (so the gateway's one `notify.user.*` subscription reaches each of them).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use parley_schemas::{DeviceId, UserId};

use crate::hub::{ConnId, Inbound, Subscriber};
use crate::stop::{StopReason, Stopper};
use crate::wire::MembershipNotice;

pub(crate) struct Registry {
    max_per_user: usize,
    /// `None`: no per-address limit.
    max_per_ip: Option<usize>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<UserId, usize>,
    addrs: HashMap<IpAddr, usize>,
    devices: HashMap<DeviceId, HashMap<ConnId, Arc<Stopper>>>,
    /// The connections membership notices about a user go to.
    followers: HashMap<UserId, HashMap<ConnId, Subscriber>>,
}

/// A reserved connection slot of a user; released on drop.
pub(crate) struct Slot {
    registry: Arc<Registry>,
    user: UserId,
}

/// A reserved connection slot of a client address (taken before authentication, so that
/// unauthenticated sockets count too); released on drop.
pub(crate) struct AddrSlot {
    registry: Arc<Registry>,
    addr: IpAddr,
}

/// The unit an address limit counts: an IPv4 address, or an IPv6 /64, the block one host or
/// subscriber line is normally given (counting single v6 addresses would limit nothing).
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
    }
}

/// A connection listed under its device and its user; unlisted on drop.
pub(crate) struct Listing {
    registry: Arc<Registry>,
    user: UserId,
    device: DeviceId,
    conn: ConnId,
}

impl Registry {
    pub(crate) fn new(max_per_user: usize, max_per_ip: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max_per_user,
            max_per_ip,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Takes one of the client address's connection slots, or `None` when all are in use.
    /// Without a known address (no `ConnectInfo`, as in some tests) nothing is counted.
    pub(crate) fn reserve_addr(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<Option<AddrSlot>> {
        let (Some(max), Some(ip)) = (self.max_per_ip, ip) else {
            return Some(None);
        };
        let addr = addr_key(ip);
        if !take(&mut self.lock().addrs, addr, max) {
            return None;
        }
        Some(Some(AddrSlot {
            registry: Arc::clone(self),
            addr,
        }))
    }

    /// Takes one of the user's connection slots, or `None` when all are in use.
    pub(crate) fn reserve(self: &Arc<Self>, user: UserId) -> Option<Slot> {
        if !take(&mut self.lock().users, user, self.max_per_user) {
            return None;
        }
        Some(Slot {
            registry: Arc::clone(self),
            user,
        })
    }

    /// Lists a connection: revoking `device` stops it, and notices about `user` reach its
    /// queue from now on.
    pub(crate) fn list(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        sub: Subscriber,
    ) -> Listing {
        let conn = sub.conn;
        let mut inner = self.lock();
        inner
            .devices
            .entry(device)
            .or_default()
            .insert(conn, Arc::clone(&sub.stopper));
        inner.followers.entry(user).or_default().insert(conn, sub);
        Listing {
            registry: Arc::clone(self),
            user,
            device,
            conn,
        }
    }

    /// Queues a membership notice to each of the user's connections here; returns how many. A
    /// connection whose queue is full is stopped as a slow consumer, as for a chat event: it
    /// rereads its memberships when it reconnects.
    pub(crate) fn notify(&self, user: UserId, notice: MembershipNotice) -> usize {
        let inner = self.lock();
        let Some(conns) = inner.followers.get(&user) else {
            return 0;
        };
        for sub in conns.values() {
            sub.must_send(Inbound::Membership(notice));
        }
        conns.len()
    }

    /// Stops every connection (the notice subscription is gone: none would learn of a new chat).
    pub(crate) fn stop_all(&self, reason: StopReason) {
        for conns in self.lock().devices.values() {
            for stopper in conns.values() {
                stopper.stop(reason);
            }
        }
    }

    /// Stops every connection of the device; returns how many there were.
    pub(crate) fn revoke(&self, device: DeviceId) -> usize {
        let inner = self.lock();
        let Some(conns) = inner.devices.get(&device) else {
            return 0;
        };
        for stopper in conns.values() {
            stopper.stop(StopReason::Revoked);
        }
        conns.len()
    }

    // Never held across an await; a poisoned map is still consistent plain data.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts one more under `key` unless it already has `max`; whether it did.
fn take<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: K, max: usize) -> bool {
    let count = counts.entry(key).or_insert(0);
    if *count >= max {
        return false;
    }
    *count += 1;
    true
}

/// Counts one less under `key`, forgetting keys that reach zero.
fn give_back<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        give_back(&mut self.registry.lock().users, &self.user);
    }
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        give_back(&mut self.registry.lock().addrs, &self.addr);
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        unlist(&mut inner.devices, &self.device, self.conn);
        unlist(&mut inner.followers, &self.user, self.conn);
    }
}

/// Removes `conn` under `key`, forgetting keys left with no connection.
fn unlist<K: Hash + Eq, V>(map: &mut HashMap<K, HashMap<ConnId, V>>, key: &K, conn: ConnId) {
    if let Some(conns) = map.get_mut(key) {
        conns.remove(&conn);
        if conns.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn slots_are_limited_per_user_and_released_on_drop() {
        let r = Registry::new(2, None);
        let u = UserId::new();
        let a = r.reserve(u).unwrap();
        let _b = r.reserve(u).unwrap();
        assert!(r.reserve(u).is_none());
        assert!(
            r.reserve(UserId::new()).is_some(),
            "other users are not affected"
        );
        drop(a);
        assert!(r.reserve(u).is_some());
    }

    #[test]
    fn slots_are_limited_per_address_with_ipv6_counted_per_64() {
        let r = Registry::new(100, Some(2));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let a = r.reserve_addr(ip("192.0.2.1")).unwrap();
        let _b = r.reserve_addr(ip("::ffff:192.0.2.1")).unwrap();
        assert!(
            r.reserve_addr(ip("192.0.2.1")).is_none(),
            "v4-mapped is the same address"
        );
        assert!(r.reserve_addr(ip("192.0.2.2")).unwrap().is_some());
        let _c = r.reserve_addr(ip("2001:db8:0:1::1")).unwrap();
        let _d = r.reserve_addr(ip("2001:db8:0:1:ffff::2")).unwrap();
        assert!(
            r.reserve_addr(ip("2001:db8:0:1::3")).is_none(),
            "one /64 is one address"
        );
        assert!(r.reserve_addr(ip("2001:db8:0:2::1")).unwrap().is_some());
        drop(a);
        assert!(r.reserve_addr(ip("192.0.2.1")).unwrap().is_some());
        assert!(
            r.reserve_addr(None).unwrap().is_none(),
            "an unknown address is not counted"
        );
        let off = Registry::new(100, None);
        let held: Vec<_> = (0..10)
            .map(|_| off.reserve_addr(ip("192.0.2.1")).unwrap())
            .collect();
        assert!(held.iter().all(Option::is_none), "no limit, no slots");
    }

    #[test]
    fn revoking_a_device_stops_its_listed_connections_only() {
        let r = Registry::new(5, None);
        let (d1, d2) = (DeviceId::new(), DeviceId::new());
        let (s1, _q1) = subscriber(1);
        let (s2, _q2) = subscriber(2);
        let u = UserId::new();
        let _l1 = r.list(u, d1, s1.clone());
        let l2 = r.list(u, d2, s2.clone());
        let (s1, s2) = (s1.stopper, s2.stopper);
        assert_eq!(r.revoke(d1), 1);
        assert!(s1.token().is_cancelled());
        assert_eq!(s1.reason(), StopReason::Revoked);
        assert!(!s2.token().is_cancelled());
        drop(l2);
        assert_eq!(r.revoke(d2), 0);
    }

    fn subscriber(conn: ConnId) -> (Subscriber, mpsc::Receiver<Inbound>) {
        let (tx, rx) = mpsc::channel(1);
        let stopper = Arc::new(Stopper::new(CancellationToken::new()));
        (Subscriber { conn, tx, stopper }, rx)
    }

    fn notice() -> MembershipNotice {
        MembershipNotice {
            chat_id: parley_schemas::ChatId::new(),
            sequence: 7,
            change: crate::wire::MembershipChange::Added,
        }
    }

    #[test]
    fn a_notice_reaches_each_listed_connection_of_its_user_and_no_other() {
        let r = Registry::new(5, None);
        let (ada, bob) = (UserId::new(), UserId::new());
        let (phone, mut phone_q) = subscriber(1);
        let (laptop, mut laptop_q) = subscriber(2);
        let (bobs, mut bob_q) = subscriber(3);
        let _p = r.list(ada, DeviceId::new(), phone);
        let l = r.list(ada, DeviceId::new(), laptop);
        let _b = r.list(bob, DeviceId::new(), bobs);
        let n = notice();
        assert_eq!(r.notify(ada, n), 2);
        for q in [&mut phone_q, &mut laptop_q] {
            match q.try_recv() {
                Ok(Inbound::Membership(got)) => assert_eq!(got.chat_id, n.chat_id),
                other => panic!("expected the notice, got {other:?}"),
            }
        }
        assert!(
            bob_q.try_recv().is_err(),
            "Bob's socket hears nothing of Ada's chats"
        );
        drop(l);
        assert_eq!(
            r.notify(ada, notice()),
            1,
            "an unlisted socket is not followed"
        );
        assert_eq!(r.notify(UserId::new(), notice()), 0);
    }

    #[test]
    fn a_connection_whose_queue_is_full_is_stopped_as_a_slow_consumer() {
        let r = Registry::new(5, None);
        let ada = UserId::new();
        let (sub, _q) = subscriber(1);
        let stopper = Arc::clone(&sub.stopper);
        let _l = r.list(ada, DeviceId::new(), sub);
        r.notify(ada, notice());
        assert!(!stopper.token().is_cancelled(), "one notice fits the queue");
        r.notify(ada, notice());
        assert!(stopper.token().is_cancelled());
        assert_eq!(stopper.reason(), StopReason::SlowConsumer);
    }
}
