//! Test guest init that never starts an agent: the guest boots and waits
//! forever, so nothing ever answers on vsock port 1024. The runtime must
//! give up after its `agent_connect_secs` with a clear error and tear the
//! VM down.

use airlock_test_guest::init;

fn main() {
    init();
    println!("silent: up, and not answering");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
