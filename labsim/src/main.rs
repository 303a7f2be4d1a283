//! `boottorrent-labsim N [host Mbit/s] [image bytes] [piece KiB] [hosts per switch] [uplink Gbit/s]`:
//! runs one simulated lab and prints the time until the last host is done, its ratio to S/B
//! and the copies the server sent.

use boottorrent_labsim::Lab;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: f64| -> f64 {
        match args.get(i) {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| {
                eprintln!("argument {} = {s:?} is not a number; usage: boottorrent-labsim N [host Mbit/s] [image bytes] [piece KiB] [hosts per switch] [uplink Gbit/s]", i + 1);
                std::process::exit(2)
            }),
        }
    };
    let host_rate = num(1, 100.0) * 1e6 / 8.0;
    let lab = Lab {
        hosts: num(0, 4.0) as usize,
        host_rate,
        server_rate: host_rate,
        image_len: num(2, 276_824_064.0) as u64,
        piece_len: (num(3, 256.0) as u32) << 10,
        per_switch: num(4, 40.0) as usize,
        uplink_rate: num(5, 10.0) * 1e9 / 8.0,
    };
    let out = lab.run(1e6);
    let ideal = lab.image_len as f64 / lab.host_rate;
    println!(
        "N={} last_done_s={:.3} ideal_s={:.3} ratio={:.3} server_copies={:.3}",
        lab.hosts,
        out.last_done,
        ideal,
        out.last_done / ideal,
        out.server_copies
    );
}
