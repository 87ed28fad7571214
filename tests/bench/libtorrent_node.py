#!/usr/bin/python3
"""One libtorrent node for shoal-wan-bench (tests/src/bin/shoal-wan-bench.rs).

    libtorrent_node.py make TORRENT FILE URL PIECE_SIZE
        writes a v1 torrent of FILE with URL as its web seed (BEP 19).
    libtorrent_node.py run TORRENT SAVE_DIR PORT PEER_PORT,...
        downloads into SAVE_DIR listening on 127.0.0.1:PORT, connected to the other nodes on
        127.0.0.1 (DHT, local service discovery, PEX, UPnP and NAT-PMP off), prints
        "done SECONDS" on stdout when every piece is in and checked, then seeds until killed.

Needs Debian's python3-libtorrent (libtorrent-rasterbar 2.0) and /usr/bin/python3.
"""

import os
import sys
import time

import libtorrent as lt


def make(torrent, path, url, piece_size):
    fs = lt.file_storage()
    lt.add_files(fs, path)
    ct = lt.create_torrent(fs, int(piece_size), flags=lt.create_torrent.v1_only)
    ct.add_url_seed(url)
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(path)))
    with open(torrent, "wb") as f:
        f.write(lt.bencode(ct.generate()))


def run(torrent, save_dir, port, peers):
    ses = lt.session(
        {
            "listen_interfaces": f"127.0.0.1:{port}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": 0,
        }
    )
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save_dir
    atp.flags |= lt.torrent_flags.disable_pex | lt.torrent_flags.disable_dht
    atp.flags |= lt.torrent_flags.disable_lsd
    t0 = time.monotonic()
    h = ses.add_torrent(atp)
    ports = [int(p) for p in peers.split(",") if p and int(p) != int(port)]
    last_connect = 0.0
    while not h.status().is_seeding:
        now = time.monotonic()
        # Every second, (re)connect to the peers that are not connected yet.
        if now - last_connect > 1.0:
            connected = {p.ip[1] for p in h.get_peer_info()}
            for p in ports:
                if p not in connected:
                    h.connect_peer(("127.0.0.1", p))
            last_connect = now
        time.sleep(0.01)
    print(f"done {time.monotonic() - t0:.3f}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "make":
        make(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "run":
        run(*sys.argv[2:])
    else:
        sys.exit(__doc__)
