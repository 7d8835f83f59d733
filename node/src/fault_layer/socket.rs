//! The UDP socket under the QUIC endpoint when the fault layer is on: outgoing datagrams are
//! delayed, reordered and duplicated as the settings say, one datagram at a time (the socket
//! offers no segmentation offload, so each transmit is one datagram). Receiving is untouched:
//! every node's egress carries its own faults.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use super::FaultLayer;

/// Delayed datagrams held at once (each a timer task and a copy of at most one datagram): a
/// 200 ms delay at a few thousand datagrams a second. Past it a datagram leaves at once, so
/// the layer's memory and tasks stay bounded whatever the traffic.
pub const DELAYED_DATAGRAMS_MAX: usize = 8_192;

/// The faulty socket over a real one.
pub struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    layer: Arc<FaultLayer>,
    runtime: tokio::runtime::Handle,
    delayed: Arc<AtomicUsize>,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl FaultySocket {
    /// Binds `listen` for quinn on the current tokio runtime, with `layer`'s faults on sends.
    pub fn bind(listen: SocketAddr, layer: Arc<FaultLayer>) -> io::Result<Arc<FaultySocket>> {
        let socket = std::net::UdpSocket::bind(listen)?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        Ok(Arc::new(FaultySocket { inner, layer, runtime, delayed: Arc::new(AtomicUsize::new(0)) }))
    }

    /// Sends a copy of `transmit`'s datagram after `wait`; `false` when [`DELAYED_DATAGRAMS_MAX`]
    /// are held already (the caller sends it now). A datagram the socket cannot take then (a
    /// full send buffer) is lost, as a router's full queue would lose it, and counted.
    fn send_later(&self, transmit: &Transmit<'_>, wait: Duration) -> bool {
        if self.delayed.fetch_add(1, Ordering::Relaxed) >= DELAYED_DATAGRAMS_MAX {
            self.delayed.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let (delayed, layer) = (self.delayed.clone(), self.layer.clone());
        let inner = self.inner.clone();
        let destination = transmit.destination;
        let ecn = transmit.ecn;
        let src_ip = transmit.src_ip;
        let contents = transmit.contents.to_vec();
        self.runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            if inner.try_send(&Transmit { destination, ecn, contents: &contents, segment_size: None, src_ip }).is_err()
            {
                layer.count_lost();
            }
            delayed.fetch_sub(1, Ordering::Relaxed);
        });
        true
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let settings = self.layer.settings();
        if !settings.touches_network() {
            return self.inner.try_send(transmit);
        }
        let plan = settings.plan_send(rand::random::<f64>);
        self.layer.count(&plan);
        for (copy, wait) in std::iter::once(plan.first).chain(plan.second).enumerate() {
            if !wait.is_zero() && self.send_later(transmit, wait) {
                continue;
            }
            // The datagram's own errors (WouldBlock included) go to quinn, which retries it;
            // a duplicate is best effort.
            let sent = self.inner.try_send(transmit);
            if copy == 0 {
                sent?;
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per transmit: faults act per datagram.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
