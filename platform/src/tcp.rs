//! Socket options for every HTTP listener Parley serves (and the benchmark's floor servers,
//! which must not lose what Parley does not).

/// Turns Nagle's algorithm off on an accepted connection (`axum::serve(listener.tap_io(no_delay),
/// …)`). A WebSocket sends many small frames in a row; with Nagle on, a frame written while the
/// previous one is unacknowledged waits for the client's delayed ACK (40 ms on Linux), which
/// showed as a send→frame p99 of exactly 40 ms in the delivery benchmark.
pub fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
}
