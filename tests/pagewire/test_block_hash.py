from pagewire.block_hash import DIGEST_BYTES, block_hash, prompt_block_hashes


def test_only_full_blocks_are_hashed() -> None:
    assert len(prompt_block_hashes(list(range(10)), 4)) == 2
    assert prompt_block_hashes(list(range(3)), 4) == []
    assert len(prompt_block_hashes(list(range(8)), 4)) == 2


def test_hash_is_chained_so_a_block_names_its_whole_prefix() -> None:
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = prompt_block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0]
    assert a[1] != b[1], "same tokens in block 1 but a different prefix must hash differently"


def test_same_prefix_gives_same_hashes_whatever_follows() -> None:
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], 4)
    assert a == b


def test_hash_is_deterministic_and_wide() -> None:
    h = block_hash(None, [1, 2, 3])
    assert h == block_hash(None, [1, 2, 3])
    assert len(h) == DIGEST_BYTES == 16
    assert block_hash(h, [1, 2, 3]) != h


def test_token_boundaries_matter() -> None:
    # Token ids are hashed as fixed-width integers, so [1, 23] and [12, 3] cannot collide.
    assert block_hash(None, [1, 23]) != block_hash(None, [12, 3])
    assert block_hash(None, [256]) != block_hash(None, [0, 1])


def test_prompt_hashes_are_block_hash_chained_over_full_blocks() -> None:
    tokens = [7 * i + 3 for i in range(70)]
    expected, parent = [], None
    for start in range(0, 64, 16):
        parent = block_hash(parent, tokens[start : start + 16])
        expected.append(parent)
    assert prompt_block_hashes(tokens, 16) == expected


def _image(offset: int, length: int, tag: bytes):  # a common_pb2.ImageInput without pixels
    from pagewire.v1 import common_pb2

    return common_pb2.ImageInput(offset=offset, length=length, hash=tag * 16)


def test_blocks_holding_an_image_hash_its_content_and_so_do_all_after() -> None:
    tokens = [9, 8, 7, 6, *[5] * 6, 4, 3]  # placeholders at [4, 10), blocks of 4
    a = prompt_block_hashes(tokens, 4, [_image(4, 6, b"a")])
    b = prompt_block_hashes(tokens, 4, [_image(4, 6, b"b")])
    assert a[0] == b[0] == prompt_block_hashes(tokens, 4)[0], "no image in block 0: text hash"
    assert a[1] != b[1] and a[2] != b[2], "another image: another block, and none after shared"


def test_same_image_same_hashes_and_block_hash_agrees() -> None:
    from pagewire.block_hash import image_extra

    tokens = list(range(12))
    images = [_image(2, 3, b"x"), _image(7, 2, b"y")]
    assert prompt_block_hashes(tokens, 4, images) == prompt_block_hashes(tokens, 4, list(images))
    parent, chained = None, []
    for s in range(0, 12, 4):
        parent = block_hash(parent, tokens[s : s + 4], image_extra(images, s, s + 4))
        chained.append(parent)
    assert chained == prompt_block_hashes(tokens, 4, images)
    assert image_extra(images, 4, 8) == b"x" * 16 + b"y" * 16  # both overlap block 1
